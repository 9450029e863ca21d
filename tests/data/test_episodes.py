"""N-way K-shot episode sampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lowlearn.data.episodes import Episode, EpisodeSampler, group_by_class, random_episodes
from lowlearn.data.omniglot import Omniglot
from lowlearn.train import stream_seed

CLASSES, EXAMPLES = 12, 9


def _ids() -> torch.Tensor:
    """``(C, M, 2)`` data whose example ``[c, m]`` is ``(c, m)``: every example is identifiable."""
    c, m = torch.meshgrid(torch.arange(CLASSES), torch.arange(EXAMPLES), indexing="ij")
    return torch.stack([c, m], dim=-1)


def test_group_by_class_truncates_to_the_smallest_class():
    y = torch.tensor([2, 0, 1, 0, 2, 1, 0, 2, 2])
    x = torch.arange(9) * 10
    grouped = group_by_class(x, y)
    assert grouped.tolist() == [[10, 30], [20, 50], [0, 40]]


def test_group_by_class_errors():
    with pytest.raises(ValueError, match=r"classes \[1\] have no examples"):
        group_by_class(torch.zeros(3), torch.tensor([0, 2, 2]))
    with pytest.raises(ValueError, match="integer labels"):
        group_by_class(torch.zeros(3), torch.zeros(3))


def test_single_episode():
    sampler = EpisodeSampler(_ids(), ways=5, shots=2, queries=3)
    episode = sampler.sample()
    assert isinstance(episode, Episode)
    assert episode.support_x.shape == (10, 2) and episode.query_x.shape == (15, 2)
    assert episode.support_y.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert episode.query_y.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]
    assert episode.classes.shape == (5,) and episode.classes.unique().numel() == 5
    # Each example's class is the class chosen for its label.
    assert torch.equal(episode.support_x[:, 0], episode.classes[episode.support_y])
    assert torch.equal(episode.query_x[:, 0], episode.classes[episode.query_y])


def test_batched_episodes_are_valid():
    batch, ways, shots, queries = 64, 5, 3, 4
    episode = EpisodeSampler(_ids(), ways, shots, queries, seed=3).sample(batch=batch)
    assert episode.support_x.shape == (batch, ways * shots, 2)
    assert episode.query_x.shape == (batch, ways * queries, 2)
    assert episode.support_y.shape == (batch, ways * shots) and episode.query_y.shape == (batch, ways * queries)
    assert episode.classes.shape == (batch, ways)
    assert torch.equal(episode.support_y, torch.arange(ways).repeat_interleave(shots).expand(batch, -1))
    assert all(row.unique().numel() == ways for row in episode.classes)
    rows = torch.arange(batch)[:, None]
    assert torch.equal(episode.support_x[..., 0], episode.classes[rows, episode.support_y])
    assert torch.equal(episode.query_x[..., 0], episode.classes[rows, episode.query_y])
    # Within each class of each episode, the shots + queries examples are distinct.
    examples = torch.cat([episode.support_x[..., 1].view(batch, ways, shots),
                          episode.query_x[..., 1].view(batch, ways, queries)], dim=2)
    assert (examples.sort(dim=2).values.diff(dim=2) > 0).all()
    # Over many episodes, every class and every example gets drawn.
    assert episode.classes.unique().numel() == CLASSES
    assert examples.unique().numel() == EXAMPLES


def test_seeds():
    def draw(seed):
        return EpisodeSampler(_ids(), ways=3, shots=1, queries=2, seed=seed).sample(batch=4)

    assert all(torch.equal(a, b) for a, b in zip(draw(0), draw(0)))
    assert not torch.equal(draw(0).support_x, draw(1).support_x)


def test_iteration_and_omniglot_input():
    images = torch.rand(6, 20, 1, 5, 5)
    data = Omniglot.from_characters(images, [f"A/character{i:02d}" for i in range(6)])
    sampler = EpisodeSampler(data, ways=2, shots=1, queries=1)
    stream = iter(sampler)
    first, second = next(stream), next(stream)
    assert first.support_x.shape == (2, 1, 5, 5)
    drawings = images[first.classes[0]]  # the support example of label 0 is one of them
    assert (drawings == first.support_x[0]).flatten(1).all(1).any()
    assert not all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("kwargs, message", [
    (dict(ways=13, shots=1, queries=1), "only 12 classes"),
    (dict(ways=2, shots=5, queries=5), r"each class has 9 examples, so shots \+ queries must be <= 9"),
    (dict(ways=0, shots=1, queries=1), "ways must be an int >= 1"),
    (dict(ways=2, shots=0, queries=1), "shots must be an int >= 1"),
    (dict(ways=2, shots=1, queries=-1), "queries must be an int >= 0"),
    (dict(ways=2.5, shots=1, queries=1), "ways must be an int >= 1; got 2.5"),
    (dict(ways=2, shots=1.0, queries=1), "shots must be an int >= 1; got 1.0"),
    (dict(ways=2, shots=1, queries=2.0), "queries must be an int >= 0; got 2.0"),
])
def test_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EpisodeSampler(_ids(), **kwargs)


def test_data_must_be_class_indexed():
    with pytest.raises(ValueError, match="group_by_class"):
        EpisodeSampler(torch.arange(10), ways=2, shots=1, queries=1)


def test_batch_must_be_a_positive_int():
    sampler = EpisodeSampler(_ids(), ways=2, shots=1, queries=1)
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match=r"batch \(or None, for one episode\) must be an int >= 1"):
            sampler.sample(batch=bad)
    assert sampler.sample(batch=np.int64(2)).classes.shape == (2, 2)


def test_episodes_within_groups_take_all_their_classes_from_one_group():
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2])       # group 0 has only 3 classes
    episode = EpisodeSampler(_ids(), ways=4, shots=1, queries=1, seed=0, groups=groups).sample(batch=200)
    as_list = EpisodeSampler(_ids(), ways=4, shots=1, queries=1, seed=0, groups=groups.tolist()).sample(batch=200)
    assert torch.equal(as_list.classes, episode.classes)             # a list of ints is taken as the tensor
    of_episode = groups[episode.classes]                              # (200, 4)
    assert (of_episode == of_episode[:, :1]).all()
    assert set(of_episode[:, 0].tolist()) == {1, 2}                   # group 0 is too small for 4 ways
    assert all(len(set(row)) == 4 for row in episode.classes.tolist())
    assert (episode.support_x[..., 0] == episode.classes).all()
    counts = torch.bincount(episode.classes.flatten(), minlength=CLASSES)[3:]
    assert (counts > 0).all()                                         # every class of groups 1 and 2 is used


def test_groups_that_cannot_give_an_episode_are_clear_errors():
    with pytest.raises(ValueError, match="no group has 5 classes"):
        EpisodeSampler(_ids(), ways=5, shots=1, queries=1, groups=torch.arange(CLASSES) % 3)
    with pytest.raises(ValueError, match="one group per class"):
        EpisodeSampler(_ids(), ways=2, shots=1, queries=1, groups=torch.zeros(5, dtype=torch.long))


def test_random_episodes_have_the_episode_layout_and_repeat_with_their_seed():
    batch = random_episodes(4, 5, 2, 3, image_size=12, seed=7, dtype=torch.float64)
    assert batch.support_x.shape == (4, 10, 1, 12, 12) and batch.query_x.shape == (4, 15, 1, 12, 12)
    assert batch.support_x.dtype == torch.float64 and batch.support_y.dtype == torch.long
    assert torch.equal(batch.support_y[0], torch.arange(5).repeat_interleave(2))
    assert torch.equal(batch.query_y[3], torch.arange(5).repeat_interleave(3))
    again = random_episodes(4, 5, 2, 3, image_size=12, seed=7, dtype=torch.float64)
    other = random_episodes(4, 5, 2, 3, image_size=12, seed=8, dtype=torch.float64)
    assert torch.equal(again.query_x, batch.query_x) and not torch.equal(other.query_x, batch.query_x)


def test_labels_classes_and_examples_are_drawn_uniformly_and_independently():
    # Labels 0 .. N-1 go to the episode's classes in random order, and each class draws its own examples in random
    # order: no class is tied to a label, no example to the support or the query set, no class to another's draws.
    batch, ways, shots, queries = 1200, 5, 3, 4
    episode = EpisodeSampler(_ids(), ways, shots, queries, seed=1).sample(batch=batch)
    for label in (0, ways - 1):                                          # 100 expected for each class
        assert (torch.bincount(episode.classes[:, label], minlength=CLASSES) > 50).all()
    assert (episode.classes.diff(dim=1) > 0).all(1).float().mean() < 0.05      # in increasing order: 1 in 120
    support = episode.support_x[..., 1].view(batch, ways, shots)
    query = episode.query_x[..., 1].view(batch, ways, queries)
    for slot in (support[:, :, 0], query[:, :, -1]):                     # 667 expected for each example
        assert (torch.bincount(slot.flatten(), minlength=EXAMPLES) > 300).all()
    # two classes of one episode drawing the very same examples: 1 in 9·8·7·6·5·4·3
    same = (support[:, 0] == support[:, 1]).all(-1) & (query[:, 0] == query[:, 1]).all(-1)
    assert same.float().mean() < 0.01


def test_zero_queries_give_an_empty_query_set_of_the_episode_layout():
    """queries=0 is allowed (check_count(..., 0)): the query set is then empty, (B, 0, *shape) and (B, 0),
    and the support set is the first ``shots`` examples of each picked class (reference: the layout of Episode)."""
    data = torch.arange(5 * 4 * 2, dtype=torch.float32).reshape(5, 4, 2)
    sampler = EpisodeSampler(data, ways=3, shots=2, queries=0, seed=1)
    episode = sampler.sample(batch=2)
    assert episode.query_x.shape == (2, 0, 2) and episode.query_y.shape == (2, 0)
    assert episode.support_x.shape == (2, 6, 2)
    one = EpisodeSampler(data, ways=3, shots=4, queries=0, seed=1).sample()      # shots = the whole class
    assert one.query_x.shape == (0, 2) and one.query_y.shape == (0,)
    for label, cls in enumerate(one.classes.tolist()):                            # each class's 4 examples, all of them
        got = one.support_x[4 * label:4 * label + 4]
        assert sorted(map(tuple, got.tolist())) == sorted(map(tuple, data[cls].tolist()))


def test_random_episodes_draw_support_then_query_images_from_one_generator():
    """Reference: the docstring's recipe, one torch.Generator seeded with ``seed`` drawing the support images
    (tasks, N*K, 1, s, s) and then the query images (tasks, N*Q, 1, s, s): so with K = Q the query images are
    new draws, not a copy of the support images."""
    episode = random_episodes(2, 3, 2, 2, image_size=5, seed=4)
    generator = torch.Generator().manual_seed(4)
    support = torch.randn(2, 6, 1, 5, 5, generator=generator)
    query = torch.randn(2, 6, 1, 5, 5, generator=generator)
    assert torch.equal(episode.support_x, support) and torch.equal(episode.query_x, query)
    assert not torch.equal(episode.support_x, episode.query_x)


def test_group_by_class_refuses_labels_that_are_not_one_dimensional():
    """Labels of shape ``(n, 1)`` are the documented ValueError, not a RuntimeError from deep inside torch."""
    with pytest.raises(ValueError, match=r"integer labels y of shape \(n,\)"):
        group_by_class(torch.zeros(4, 3), torch.tensor([[0], [1], [0], [1]]))


@pytest.mark.parametrize("inputs", [5, 3], ids=["more-inputs", "fewer-inputs"])
def test_group_by_class_refuses_inputs_and_labels_of_different_lengths(inputs):
    """Four labels with five inputs would silently drop an input (and pair the rest by position); with three,
    index past the end: both are the ValueError that shows both shapes."""
    with pytest.raises(ValueError, match=rf"got x \({inputs}, 2\) and y \(4,\)"):
        group_by_class(torch.zeros(inputs, 2), torch.tensor([0, 1, 0, 1]))


@pytest.mark.parametrize("labels", [[0, 1, -1, 1], [-3, 0, 1, 0]])
def test_group_by_class_refuses_negative_labels(labels):
    """Labels must be ``0 .. C-1``: a negative one is the ValueError that says so (torch.bincount would raise a
    RuntimeError instead)."""
    with pytest.raises(ValueError, match=r"labels in 0 \.\. C-1"):
        group_by_class(torch.zeros(4, 2), torch.tensor(labels))


def test_group_by_class_refuses_a_huge_label_before_counting_up_to_it():
    """A label far above the number of examples is refused at once, without allocating a count for every class
    below it (here 10**12 of them)."""
    with pytest.raises(ValueError, match=r"the largest label is 1000000000000, but there are only 2 examples"):
        group_by_class(torch.zeros(2, 2), torch.tensor([0, 10**12]))


@pytest.mark.parametrize("seed", [-1, 1.5])
def test_a_seed_that_is_not_an_int_of_at_least_zero_is_refused(seed):
    """The sampler's and random_episodes' ``seed`` is an int >= 0: -1 (which torch would silently take as
    2**64 - 1) and 1.5 are ValueErrors that name the seed."""
    with pytest.raises(ValueError, match="seed must be an int >= 0"):
        EpisodeSampler(_ids(), ways=2, shots=1, queries=1, seed=seed)
    with pytest.raises(ValueError, match="seed must be an int >= 0"):
        random_episodes(2, 3, 1, 1, image_size=4, seed=seed)


@pytest.mark.parametrize("groups", [torch.arange(CLASSES) // 4 * 1.0, torch.arange(CLASSES) % 2 == 0],
                         ids=["float", "bool"])
def test_groups_must_be_integers(groups):
    """``groups`` holds integers, one per class: float or bool groups are refused, not taken as groups."""
    with pytest.raises(ValueError, match="groups must be an integer tensor with one group per class"):
        EpisodeSampler(_ids(), ways=2, shots=1, queries=1, groups=groups)


def test_a_group_with_exactly_ways_classes_is_eligible():
    """A group with exactly ``ways`` classes can give an episode ("at least ``ways`` classes"), also when it is
    the largest group; only the smaller groups are never picked."""
    groups = torch.tensor([0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5])                     # group 0: three classes
    episode = EpisodeSampler(_ids(), ways=3, shots=1, queries=1, seed=0, groups=groups).sample(batch=20)
    assert (episode.classes.sort(dim=1).values == torch.tensor([0, 1, 2])).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_groups_given_as_a_list_sample_on_the_datas_gpu():
    """Data on the GPU with groups given as a Python list (or a CPU tensor): the groups move to the data's device,
    and the sampler's generator lives there, so episodes are drawn without a device mismatch."""
    data = _ids().cuda()
    groups = (torch.arange(CLASSES) // 4).tolist()
    for given in (groups, torch.tensor(groups)):
        sampler = EpisodeSampler(data, ways=3, shots=1, queries=1, seed=0, groups=given)
        assert sampler.generator.device.type == "cuda" and sampler.groups.device == data.device
        episode = sampler.sample(batch=8)
        assert episode.classes.device == data.device
        assert (episode.classes // 4 == episode.classes[:, :1] // 4).all()


@pytest.mark.parametrize("name, value, minimum", [("tasks", -1, 1), ("tasks", 2.0, 1), ("ways", 0, 1), ("shots", -1, 1),
                                                  ("queries", -2, 0), ("image_size", 0, 1)])
def test_random_episodes_refuses_a_count_out_of_range(name, value, minimum):
    """Negative sizes failed in torch ("negative dimension"), a float in repeat(), and ways=0 or image_size=0
    gave empty episodes; each is now a ValueError that names the argument."""
    counts = dict(tasks=2, ways=3, shots=1, queries=1, image_size=4) | {name: value}
    with pytest.raises(ValueError, match=f"{name} must be an int >= {minimum}; got {value}"):
        random_episodes(**counts)


def test_random_episodes_takes_numpy_counts():
    episode = random_episodes(np.int64(2), np.int64(3), np.int64(1), np.int64(2), image_size=np.int64(4))
    assert episode.support_x.shape == (2, 3, 1, 4, 4) and episode.query_y.shape == (2, 6)


def test_the_sampler_draws_from_its_own_stream_not_from_the_numbers_that_made_a_learners_weights():
    """seed=s seeds the sampler with stream_seed(s, "episodes"): a learner built under seed_everything(s) and a
    sampler with seed=s do not share their numbers (torch.Generator().manual_seed(s) repeats torch.manual_seed(s)'s
    draws on a CPU)."""
    data = _ids()
    for seed in (0, 7):
        sampler = EpisodeSampler(data, ways=2, shots=1, queries=1, seed=seed)
        assert sampler.generator.initial_seed() == stream_seed(seed, "episodes")
        same = EpisodeSampler(data, ways=2, shots=1, queries=1, seed=seed).sample(batch=4)
        assert torch.equal(sampler.sample(batch=4).support_x, same.support_x)


def test_random_episodes_are_made_on_the_cpu_whatever_the_default_device():
    """With PyTorch's default device set elsewhere (``meta`` here stands for ``cuda``, where a CPU generator
    cannot draw on the default device and raises), the episodes are drawn on the CPU from the seed, the very
    ones drawn without a default device, and ``device=`` still moves them."""
    expected = random_episodes(2, 3, 2, 1, image_size=4, seed=5)
    with torch.device("meta"):
        got = random_episodes(2, 3, 2, 1, image_size=4, seed=5)
        moved = random_episodes(2, 3, 2, 1, image_size=4, seed=5, device="meta")
    assert all(a.device.type == "cpu" and torch.equal(a, b) for a, b in zip(got, expected))
    assert all(t.device.type == "meta" for t in moved)
