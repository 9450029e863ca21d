"""Episode sampling against exact combinatorial references (chi-square tests on enumerated outcomes).

tests/data/test_episodes.py checks validity and loose per-class counts. These check that the *joint*
distribution is the uniform one the docstring promises: every ordered choice of N distinct classes equally
likely (C!/(C-N)! outcomes), every ordered choice of K+Q distinct examples of a class equally likely, and,
with ``groups``, every eligible group equally likely whatever its size. Sample sizes and thresholds are fixed
(seeded), with the chi-square cut at the 0.999 quantile, so the tests are deterministic.
"""

from __future__ import annotations

import itertools

import torch

from lowlearn.data.episodes import EpisodeSampler, group_by_class


def _ids(classes: int, examples: int) -> torch.Tensor:
    c, m = torch.meshgrid(torch.arange(classes), torch.arange(examples), indexing="ij")
    return torch.stack([c, m], dim=-1)


def _chi_square(counts: list[int], expected: float) -> float:
    return sum((c - expected) ** 2 / expected for c in counts)


# 0.999 quantiles of the chi-square distribution (Abramowitz & Stegun table 26.8 / scipy.stats.chi2.ppf).
CHI2_999 = {19: 43.82, 11: 31.26, 9: 27.88, 1: 10.83}


def test_ordered_class_choices_are_uniform():
    """C = 5, N = 2: the 20 ordered pairs (label 0's class, label 1's class) each have probability 1/20."""
    episodes = EpisodeSampler(_ids(5, 4), ways=2, shots=1, queries=1, seed=7).sample(batch=6000)
    pairs = [tuple(row) for row in episodes.classes.tolist()]
    outcomes = list(itertools.permutations(range(5), 2))
    assert set(pairs) <= set(outcomes)                                # two distinct classes, always
    counts = [pairs.count(o) for o in outcomes]
    assert _chi_square(counts, 6000 / 20) < CHI2_999[19]


def test_ordered_example_choices_are_uniform_and_split_support_from_query():
    """M = 4, K = 1, Q = 1: (support example, query example) is one of the 12 ordered distinct pairs, uniformly."""
    episode = EpisodeSampler(_ids(3, 4), ways=3, shots=1, queries=1, seed=3).sample(batch=2000)
    support, query = episode.support_x[..., 1].flatten().tolist(), episode.query_x[..., 1].flatten().tolist()
    pairs = list(zip(support, query))
    outcomes = list(itertools.permutations(range(4), 2))
    assert set(pairs) <= set(outcomes)                                # never the same example twice
    counts = [pairs.count(o) for o in outcomes]
    assert _chi_square(counts, len(pairs) / 12) < CHI2_999[11]


def test_groups_are_picked_uniformly_not_by_their_size():
    """Docstring: 'picked uniformly among the groups with at least ways classes' - a 2-class and a 10-class group
    are each picked half the time (weighting by size would give 1/6 and 5/6)."""
    groups = torch.tensor([0, 0] + [1] * 10)
    episode = EpisodeSampler(_ids(12, 3), ways=2, shots=1, queries=1, seed=5, groups=groups).sample(batch=4000)
    picked = groups[episode.classes[:, 0]]
    small = int((picked == 0).sum())
    assert _chi_square([small, 4000 - small], 2000) < CHI2_999[1]
    # within the 10-class group, each class is equally likely in slot 0
    big = episode.classes[picked == 1][:, 0]
    counts = torch.bincount(big - 2, minlength=10).tolist()
    assert _chi_square(counts, len(big) / 10) < CHI2_999[9]


def test_more_shots_and_queries_than_a_class_holds_is_refused_whatever_the_split():
    """Any K + Q > M is refused (not only K > M), naming K, Q and M; K + Q == M uses every example once."""
    data = _ids(4, 5)
    for shots, queries in ((6, 0), (3, 3), (1, 5)):
        try:
            EpisodeSampler(data, ways=2, shots=shots, queries=queries)
        except ValueError as error:
            assert "5 examples" in str(error) and f"shots={shots}" in str(error) and f"queries={queries}" in str(error)
        else:
            raise AssertionError(f"shots={shots}, queries={queries} accepted with 5 examples per class")
    episode = EpisodeSampler(data, ways=4, shots=2, queries=3, seed=0).sample()
    used = torch.cat([episode.support_x.view(4, 2, 2), episode.query_x.view(4, 3, 2)], dim=1)[..., 1]
    assert torch.equal(used.sort(dim=1).values, torch.arange(5).expand(4, 5))


def test_group_by_class_equals_a_python_loop():
    """group_by_class == for each class, its examples in their original order, cut to the smallest class size."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 6, (200,), generator=g)
    x = torch.randn(200, 3, generator=g)
    smallest = min(int((y == c).sum()) for c in range(6))
    expected = torch.stack([torch.stack([x[i] for i in range(200) if y[i] == c][:smallest]) for c in range(6)])
    assert torch.equal(group_by_class(x, y), expected)


def test_the_same_seed_gives_the_same_episodes_batch_by_batch():
    """Reproducibility of a stream: two samplers with one seed agree draw for draw, over several batches."""
    a = EpisodeSampler(_ids(8, 6), ways=3, shots=2, queries=2, seed=42)
    b = EpisodeSampler(_ids(8, 6), ways=3, shots=2, queries=2, seed=42)
    for _ in range(3):
        ea, eb = a.sample(batch=4), b.sample(batch=4)
        assert all(torch.equal(u, v) for u, v in zip(ea, eb))
