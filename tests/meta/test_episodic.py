"""The episodic meta-training loop."""

import pytest
import torch

from lowlearn.data.episodes import random_episodes
from lowlearn.meta.episodic import meta_train


class Recorder:
    """A learner whose k-th meta-step reports loss k and accuracy k/10, steps the optimizer and keeps its episodes."""

    def __init__(self):
        self.seen = []

    def meta_step(self, tasks, optimizer):
        self.seen.append(tasks)
        if optimizer is not None:
            optimizer.step()
        k = len(self.seen)
        return {"loss": torch.tensor(float(k)), "accuracy": torch.tensor(k / 10)}


class Fixed:
    """A sampler of the same random episodes every time, which keeps the batch sizes asked for."""

    def __init__(self):
        self.batches = []

    def sample(self, batch):
        self.batches.append(batch)
        return random_episodes(batch, 2, 1, 1, image_size=4)


def test_each_record_is_the_mean_of_the_steps_since_the_last_a_shorter_last_stretch_included():
    assert meta_train(Recorder(), Fixed(), None, 5, log_every=2) == pytest.approx([1.5, 3.5, 5.0])
    assert meta_train(Recorder(), Fixed(), None, 7, log_every=3, record="accuracy") == pytest.approx([0.2, 0.5, 0.7])


def test_the_transform_reaches_support_and_query_inputs_and_the_scheduler_steps_once_per_meta_step():
    learner, sampler = Recorder(), Fixed()
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    meta_train(learner, sampler, optimizer, 3, batch=2, transform=lambda x: x + 100, scheduler=scheduler)
    assert sampler.batches == [2, 2, 2] and len(learner.seen) == 3
    original = random_episodes(2, 2, 1, 1, image_size=4)
    for tasks in learner.seen:
        torch.testing.assert_close(tasks.support_x, original.support_x + 100)
        torch.testing.assert_close(tasks.query_x, original.query_x + 100)
        assert torch.equal(tasks.support_y, original.support_y) and torch.equal(tasks.query_y, original.query_y)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5 ** 3)
