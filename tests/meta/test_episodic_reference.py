"""lowlearn.meta.episodic against hand-written expectations: chunked evaluation, non-finite losses, bad records."""

import math

import pytest
import torch

from lowlearn.data.episodes import random_episodes
from lowlearn.meta.episodic import episode_accuracies, meta_train


class Counting:
    """A sampler whose episodes carry their running index in support_y[:, 0] (its own count of episodes drawn)."""

    def __init__(self):
        self.drawn, self.batches = 0, []

    def sample(self, batch):
        tasks = random_episodes(batch, 2, 1, 1, image_size=4)
        index = torch.arange(self.drawn, self.drawn + batch)
        self.drawn += batch
        self.batches.append(batch)
        return tasks._replace(support_y=index[:, None].expand(batch, tasks.support_y.shape[1]).clone())


@pytest.mark.parametrize("episodes, batch, calls", [(7, 3, [3, 3, 1]), (6, 3, [3, 3]), (2, 100, [2]), (1, 1, [1])])
def test_episode_accuracies_ask_for_full_chunks_then_the_rest_and_keep_the_episodes_in_order(episodes, batch, calls):
    """Every episode is scored once, in the order drawn: the result is evaluate's values concatenated."""
    sampler = Counting()
    scores = episode_accuracies(lambda tasks: tasks.support_y[:, 0].double() / 10, sampler, episodes, batch)
    assert sampler.batches == calls
    assert scores.tolist() == pytest.approx([i / 10 for i in range(episodes)])


class Losses:
    """A learner reporting the given losses in turn, and accuracy 0.5."""

    def __init__(self, losses):
        self.losses = list(losses)

    def meta_step(self, tasks, optimizer):
        return {"loss": torch.tensor(self.losses.pop(0)), "accuracy": torch.tensor(0.5)}


@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("record", ["loss", "accuracy"])
def test_a_non_finite_loss_inside_a_logging_stretch_stops_training_at_the_next_read(bad, record):
    """The loss is checked whatever is recorded; a NaN or inf at step 2 is found at the read after step 3."""
    sampler = Counting()
    with pytest.raises(FloatingPointError, match="by step 3"):
        meta_train(Losses([1.0, bad, 1.0, 1.0, 1.0, 1.0]), sampler, None, 6, log_every=3, record=record)
    assert len(sampler.batches) == 3


def test_an_unknown_record_is_a_key_error_naming_the_statistics_there_are():
    with pytest.raises(KeyError, match=r"\['accuracy', 'loss'\], not 'acc'"):
        meta_train(Losses([1.0]), Counting(), None, 1, record="acc")


def test_zero_steps_draw_no_episode_and_record_nothing():
    sampler = Counting()
    assert meta_train(Losses([]), sampler, None, 0) == [] and sampler.batches == []
