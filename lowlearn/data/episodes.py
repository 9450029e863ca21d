"""N-way K-shot episodes for few-shot learning.

An *episode* is a tiny classification task: ``N`` classes ("ways") drawn from a
large pool, ``K`` labelled examples of each ("shots", the *support set*) and
``Q`` further examples of each to classify (the *query set*). Labels are
relabelled ``0 .. N-1`` in every episode, so a model cannot memorise classes: it
must learn to learn from the support set. Training on episodes that look like
the test tasks is the recipe of Matching Networks (Vinyals et al., 2016,
"Matching networks for one shot learning", NeurIPS) and Prototypical Networks
(Snell et al., 2017, "Prototypical networks for few-shot learning", NeurIPS).

Data are class-indexed tensors ``(C, M, *shape)``: ``C`` classes of ``M``
examples each (an :class:`~lowlearn.data.omniglot.Omniglot` dataset's
``images``, or :func:`group_by_class` of a flat labelled dataset). Episodes are
sampled on the data's device with vectorised indexing: no Python loop over
episodes, classes or examples, and no host synchronisation.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import Tensor

from lowlearn.checks import check_count
from lowlearn.data.omniglot import Omniglot
from lowlearn.train import seeded_generator


def group_by_class(x: Tensor, y: Tensor) -> Tensor:
    """Arrange flat labelled examples as a class-indexed tensor.

    Args:
        x: ``(n, *shape)`` examples.
        y: int64 ``(n,)`` labels in ``0 .. C-1``, every class present.

    Returns:
        ``(C, M, *shape)``: ``out[c]`` holds the first ``M`` examples of class
        ``c`` in their original order, where ``M`` is the size of the smallest
        class. Examples beyond ``M`` in larger classes are dropped, so that every
        class has the same number of examples.
    """
    if y.dim() != 1 or x.shape[0] != y.shape[0] or y.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"group_by_class needs x of shape (n, ...) and integer labels y of shape (n,); "
                         f"got x {tuple(x.shape)} and y {tuple(y.shape)} of dtype {y.dtype}")
    if y.numel() == 0 or y.min() < 0:
        raise ValueError("group_by_class needs at least one example and labels in 0 .. C-1")
    if y.max() >= len(y):                    # before bincount allocates a count for every label up to the largest
        raise ValueError(f"the largest label is {int(y.max())}, but there are only {len(y)} examples, so some of "
                         "the classes below it have none; relabel y to 0 .. C-1 without gaps")
    counts = torch.bincount(y)
    smallest = int(counts.min())
    if smallest == 0:
        missing = (counts == 0).nonzero().squeeze(1).tolist()
        raise ValueError(f"classes {missing} have no examples; relabel y to 0 .. C-1 without gaps")
    order = torch.argsort(y, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    index = starts[:, None] + torch.arange(smallest, device=y.device)
    return x[order[index]]


class Episode(NamedTuple):
    """An N-way K-shot episode with Q queries per class.

    With ``batch=B``, every field has a leading batch dimension ``B``.

    Attributes:
        support_x: ``(N*K, *shape)`` support examples, class-major.
        support_y: int64 ``(N*K,)`` labels ``0 .. N-1``, i.e. ``arange(N).repeat_interleave(K)``.
        query_x: ``(N*Q, *shape)`` query examples, class-major.
        query_y: int64 ``(N*Q,)``, ``arange(N).repeat_interleave(Q)``.
        classes: int64 ``(N,)`` the original class of each episode label.
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor
    classes: Tensor


def random_episodes(tasks: int, ways: int, shots: int, queries: int, image_size: int = 28, *, seed: int = 0,
                    dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Episode:
    """A batch of ``tasks`` episodes of random one-channel images, in the layout of :class:`Episode`.

    For benchmarks and tests, where what the images show does not matter: a step's
    speed does not depend on it, and a test compares two computations on the same
    input. Images are standard normal (from ``seed``), ``(tasks, N*K, 1, size, size)``
    and ``(tasks, N*Q, 1, size, size)``; labels are class-major ``0 .. N-1``. Everything is
    made on the CPU, whatever PyTorch's default device, so that a seed gives the same
    episodes on every device, and then moved to ``device`` (default: left on the CPU).

    Raises:
        ValueError: a ``tasks``, ``ways``, ``shots`` or ``image_size`` that is not an int >= 1,
            or a ``queries`` or ``seed`` that is not an int >= 0 (as :class:`EpisodeSampler`).
    """
    tasks, ways = check_count("tasks", tasks, 1), check_count("ways", ways, 1)
    shots, queries = check_count("shots", shots, 1), check_count("queries", queries, 0)
    image_size = check_count("image_size", image_size, 1)
    generator = torch.Generator().manual_seed(check_count("seed", seed, 0))
    cpu = generator.device

    def labels(per_class: int) -> Tensor:
        return torch.arange(ways, device=cpu).repeat_interleave(per_class).repeat(tasks, 1)

    def images(per_class: int) -> Tensor:
        return torch.randn(tasks, ways * per_class, 1, image_size, image_size, generator=generator, dtype=dtype,
                           device=cpu)

    classes = torch.arange(ways, device=cpu).repeat(tasks, 1)
    return Episode(*(t.to(device) for t in (images(shots), labels(shots), images(queries), labels(queries), classes)))


class EpisodeSampler:
    """Sample N-way K-shot episodes from a class-indexed tensor.

    Each episode picks ``ways`` distinct classes, then ``shots + queries``
    distinct examples of each: the first ``shots`` form the support set, the
    others the query set, so support and query never share an example.

    Args:
        data: ``(C, M, *shape)`` tensor on any device, or an
            :class:`~lowlearn.data.omniglot.Omniglot` (its ``images``).
        ways: classes per episode, ``N``.
        shots: support examples per class, ``K``.
        queries: query examples per class, ``Q``.
        seed: an int >= 0; the sampler's own generator, on ``data``'s device, is
            ``seeded_generator(seed, "episodes")`` (:func:`lowlearn.train.seeded_generator`):
            the same seed gives the same episodes, and they are not drawn from the
            numbers ``seed_everything(seed)`` drew for a learner's initial weights.
        groups: optional integers ``(C,)`` (a tensor or a list), a group of each
            class, e.g. an Omniglot dataset's ``alphabet_index``. Each episode then
            draws all its classes from one group, picked uniformly among the groups
            with at least ``ways`` classes: the within-alphabet episodes of Lake et
            al. (2015)'s one-shot runs, harder than episodes that mix alphabets.

    Example::

        sampler = EpisodeSampler(omniglot, ways=5, shots=1, queries=15)
        episode = sampler.sample(batch=32)   # episode.support_x: (32, 5, 1, 28, 28)
    """

    def __init__(self, data: Tensor | Omniglot, ways: int, shots: int, queries: int, seed: int = 0,
                 groups: Tensor | None = None):
        self.data = data.images if isinstance(data, Omniglot) else data
        _check_episode(self.data, ways, shots, queries)
        self.ways, self.shots, self.queries = ways, shots, queries
        self.generator = seeded_generator(seed, "episodes", self.data.device)
        self.groups, self.eligible = None, None
        if groups is not None:
            self.groups = torch.as_tensor(groups).to(self.data.device)      # a list of ints works too
            self.eligible = _eligible_groups(self.groups, self.data.shape[0], ways)

    def sample(self, batch: int | None = None) -> Episode:
        """One episode, or ``batch`` episodes stacked along a new leading dimension.

        Raises:
            ValueError: a ``batch`` that is not an int >= 1 (nor None).
        """
        if batch is not None:
            check_count("batch (or None, for one episode)", batch, 1)
        episodes = 1 if batch is None else batch
        classes = self._draw(episodes, self.data.shape[0], self.ways) if self.groups is None \
            else self._draw_within_groups(episodes)                                         # (B, N)
        examples = self._draw(episodes * self.ways, self.data.shape[1], self.shots + self.queries)
        picked = self.data[classes.view(episodes, self.ways, 1),
                           examples.view(episodes, self.ways, -1)]                        # (B, N, K+Q, *shape)
        shape = self.data.shape[2:]
        episode = Episode(
            support_x=picked[:, :, :self.shots].reshape(episodes, -1, *shape),
            support_y=self._labels(episodes, self.shots),
            query_x=picked[:, :, self.shots:].reshape(episodes, -1, *shape),
            query_y=self._labels(episodes, self.queries),
            classes=classes,
        )
        return episode if batch is not None else Episode(*(field[0] for field in episode))

    def __iter__(self) -> Iterator[Episode]:
        """Yield single episodes forever."""
        while True:
            yield self.sample()

    def _draw(self, rows: int, population: int, count: int) -> Tensor:
        """int64 ``(rows, count)``: ``count`` distinct indices below ``population`` in each row.

        The ranks of i.i.d. uniform keys are a uniformly random permutation.
        """
        keys = torch.rand(rows, population, generator=self.generator, device=self.data.device)
        return keys.argsort(dim=1)[:, :count]

    def _draw_within_groups(self, episodes: int) -> Tensor:
        """int64 ``(episodes, ways)``: distinct classes of one random eligible group per episode.

        Classes outside the episode's group get keys above every key inside it, so
        they sort last.
        """
        pick = torch.randint(self.eligible.shape[0], (episodes,), generator=self.generator, device=self.data.device)
        outside = self.groups.unsqueeze(0) != self.eligible[pick].unsqueeze(1)            # (B, C)
        keys = torch.rand(outside.shape, generator=self.generator, device=self.data.device) + 2.0 * outside
        return keys.argsort(dim=1)[:, :self.ways]

    def _labels(self, episodes: int, per_class: int) -> Tensor:
        """int64 ``(episodes, ways * per_class)``: ``arange(ways).repeat_interleave(per_class)`` per row."""
        labels = torch.arange(self.ways, device=self.data.device).repeat_interleave(per_class)
        return labels.repeat(episodes, 1)


def _eligible_groups(groups: Tensor, classes: int, ways: int) -> Tensor:
    """The groups with at least ``ways`` classes, or a ValueError that says what is wrong."""
    if groups.shape != (classes,) or groups.dtype.is_floating_point or groups.dtype == torch.bool:
        raise ValueError(f"groups must be an integer tensor with one group per class, shape ({classes},); got "
                         f"{groups.dtype} of shape {tuple(groups.shape)}")
    names, sizes = groups.unique(return_counts=True)
    if not (sizes >= ways).any():
        raise ValueError(f"no group has {ways} classes for a {ways}-way episode (the largest has {int(sizes.max())}): "
                         "use fewer ways or larger groups")
    return names[sizes >= ways]


def _check_episode(data: Tensor, ways: int, shots: int, queries: int) -> None:
    """Raise a ValueError that says what to change if ``data`` cannot give these episodes."""
    if data.dim() < 2:
        raise ValueError(f"data must be class-indexed, of shape (classes, examples, ...); got shape "
                         f"{tuple(data.shape)}. Use group_by_class(x, y) to arrange a flat dataset")
    classes, examples = data.shape[:2]
    check_count("ways", ways, 1)
    check_count("shots", shots, 1)
    check_count("queries", queries, 0)
    if ways > classes:
        raise ValueError(f"ways={ways}, but the data hold only {classes} classes: use ways <= {classes}")
    if shots + queries > examples:
        raise ValueError(f"each class has {examples} examples, so shots + queries must be <= {examples}; "
                         f"got shots={shots} + queries={queries} = {shots + queries}")
