"""Metric-based meta-learning: Prototypical Networks and Matching Networks.

Not every learner is an optimiser. A metric-based learner embeds the support set
once and classifies a query by comparing its embedding with the support
embeddings: "learning" a new task is a forward pass, and meta-training learns the
embedding ``f_φ`` end to end through episodes shaped like the test tasks.

* :class:`ProtoNet` (Snell, Swersky & Zemel 2017, "Prototypical networks for
  few-shot learning", NeurIPS): each class ``k`` is its prototype, the mean
  embedding of its support examples, ``c_k = (1/|S_k|) Σ_{(x_i, y_i) ∈ S_k} f_φ(x_i)``
  (their eq. 1), and ``p(y = k | x) = softmax_k(−‖f_φ(x) − c_k‖²)`` (eq. 2).
* :class:`MatchingNet` (Vinyals et al. 2016, "Matching networks for one shot
  learning", NeurIPS), the basic form without full-context embeddings:
  ``P(ŷ | x̂, S) = Σ_i a(x̂, x_i) y_i`` (eq. 1) with the attention
  ``a(x̂, x_i) = softmax_i(c(f(x̂), g(x_i)))`` over the support set, ``c`` the
  cosine similarity (eq. 2) and ``f = g`` one shared embedding.

Both are permutation invariant in the support set: prototypes are means and the
attention is a sum, so shuffling the support examples cannot change a
prediction. Both take one episode (``support_x (S, ...)``) or a batch of
episodes with a leading task dimension (``(B, S, ...)``), such as
:class:`lowlearn.data.episodes.Episode`, and embed all of a batch's images in a
single forward pass of the embedding network (in evaluation mode, one pass per
episode where batch norm would otherwise share statistics between episodes).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import check_count, check_flag, check_positive
from ..data.augment import shifted_copies
from .functional import values_are_free_to_read
from .maml import TaskBatch


def check_episode_labels(support_y: Tensor, query_y: Tensor | None, ways: int) -> None:
    """Raise a ValueError naming the problem unless every class ``0 .. ways−1`` has support examples.

    Query labels, if given, must be classes of the support set. The values are checked
    on the CPU only (:func:`~lowlearn.meta.functional.values_are_free_to_read`), with two
    reads; dtypes and sizes everywhere.
    """
    _check_label_dtype(support_y, query_y)
    if support_y.dim() == 0 or support_y.numel() == 0:
        raise ValueError("the support set is empty: every class needs at least one support example")
    if ways > support_y.shape[-1]:                      # before counting: a count per class takes memory per class
        raise ValueError(f"{ways} ways but {support_y.shape[-1]} support examples per episode: some class has none; "
                         "relabel each episode's classes 0 .. N-1 (or pass a smaller number of ways)")
    if not values_are_free_to_read(support_y):
        return
    labels = support_y.reshape(-1, support_y.shape[-1])
    queries = query_y is not None and query_y.numel() > 0
    stats = [labels.min(), labels.max()] + ([query_y.min(), query_y.max()] if queries else [])
    low, high, *query_range = torch.stack(stats).tolist()
    if low < 0 or high >= ways:
        raise ValueError(f"support labels must be in 0 .. {ways - 1} for {ways} ways, got labels from {low} to "
                         f"{high}; relabel each episode's classes 0 .. N-1")
    counts = F.one_hot(labels, ways).sum(1)                                  # (tasks, ways)
    fewest = int(counts.min())
    if fewest == 0:
        empty = (counts == 0).nonzero()[0].tolist()
        raise ValueError(f"class {empty[1]} of episode {empty[0]} has no support example: every one of the {ways} "
                         "classes needs at least one (or pass a smaller number of ways)")
    if queries and (query_range[0] < 0 or query_range[1] >= ways):
        raise ValueError(f"query labels from {query_range[0]} to {query_range[1]} include a class that is not in "
                         f"the support set (classes 0 .. {ways - 1}): every query class needs support examples")


def _check_label_dtype(*labels: Tensor | None) -> None:
    """Raise a ValueError unless every tensor of ``labels`` (``None`` skipped) holds integers (not booleans)."""
    for y in labels:
        if y is not None and (y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool):
            raise ValueError(f"metric-based learners classify: support_y and query_y must be integer class labels, "
                             f"got {y.dtype}")


def _norms_without_running_statistics(module: nn.Module) -> list[str]:
    """Names of the batch norms of ``module`` that normalise with the statistics of each pass in evaluation mode."""
    return [name for name, m in module.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is None]


def _ways(support_y: Tensor) -> int:
    """One more than the largest support label, at least 1 (the checks then refuse negative labels or no labels)."""
    return max(int(support_y.max()) + 1, 1) if support_y.numel() else 1


def class_means(embeddings: Tensor, labels: Tensor, ways: int) -> Tensor:
    """The prototypes ``c_k``: the mean embedding of each class (Snell et al., eq. 1).

    Args:
        embeddings: ``(..., S, D)`` support embeddings.
        labels: int64 ``(..., S)`` classes in ``0 .. ways−1``, each present.
        ways: ``N``.

    Returns:
        ``(..., N, D)``, row ``k`` the mean of the embeddings labelled ``k``.
    """
    onehot = F.one_hot(labels, ways).to(embeddings.dtype)                    # (..., S, N)
    sums = onehot.transpose(-1, -2) @ embeddings                             # (..., N, D)
    return sums / onehot.sum(-2).unsqueeze(-1)


def squared_distances(a: Tensor, b: Tensor) -> Tensor:
    """``‖a_q − b_k‖²`` for every pair: ``(..., Q, D)`` and ``(..., N, D)`` give ``(..., Q, N)``.

    Computed as ``‖a‖² − 2 a·b + ‖b‖²`` (one matrix product), clamped at zero
    against rounding, after moving both sets by the mean of ``b``. The distances stay
    the same, but the terms no longer carry an offset that all the embeddings share
    (ReLU features are all positive), whose square would swamp the distances in the
    subtraction, in low precision above all.
    """
    centre = b.mean(-2, keepdim=True)
    a, b = a - centre, b - centre
    cross = a @ b.transpose(-1, -2)
    return (a.pow(2).sum(-1, keepdim=True) - 2 * cross + b.pow(2).sum(-1).unsqueeze(-2)).clamp_min(0)


class EpisodicLearner(nn.Module, ABC):
    """A learner that maps a support set and query inputs to query logits in one forward pass.

    Subclasses define :meth:`scores`; this class embeds the images, checks the
    labels and provides the meta-training step and the evaluation.

    Args:
        embedding: ``f_φ``, maps a batch of inputs ``(n, ...)`` to ``(n, D)``
            (e.g. :class:`lowlearn.models.Conv4` with ``num_classes=None``).
        test_shift: in evaluation mode, embed each image as the mean embedding of
            itself and four copies shifted by this many pixels
            (:func:`lowlearn.data.augment.shifted_copies`; test-time augmentation,
            for images only); 0 embeds the image alone. Training is unaffected.
        test_rotations: in evaluation mode, embed each square image in its four 90°
            rotations too and put the four embeddings side by side, scaled by ½, so
            that a squared distance is the mean of the four rotated frames' (for
            :class:`ProtoNet`, an ensemble of four comparisons at four times the
            cost). For an embedding meta-trained with rotated classes (Omniglot's
            rotations, which make a rotated character a new class), each frame is a
            comparison it has learned.
        eval_batch_size: in evaluation mode, pass at most this many images through
            the embedding at once (``None``: all of them, shifted copies included,
            in one pass). The embeddings are the same; on a CPU, passes of about 64
            images of a Conv4 run several times faster than one pass of thousands,
            whose activations fall out of the caches, and need less memory. Only for
            embeddings that treat every image on its own in evaluation mode: batch
            norm without running statistics is refused.

    Raises:
        ValueError: a negative ``test_shift``, an ``eval_batch_size`` below 1, or one for an
            embedding with batch norm that normalises with the statistics of the batch.
        TypeError: ``test_rotations`` other than ``True`` or ``False``.
    """

    def __init__(self, embedding: nn.Module, test_shift: int = 0, test_rotations: bool = False,
                 eval_batch_size: int | None = None):
        super().__init__()
        test_shift = check_count("test_shift (pixels)", test_shift, 0)
        test_rotations = check_flag("test_rotations", test_rotations)
        if eval_batch_size is not None:
            eval_batch_size = check_count("eval_batch_size", eval_batch_size, 1)
            batch_statistics = _norms_without_running_statistics(embedding)
            if batch_statistics:
                raise ValueError(f"eval_batch_size would change the embeddings: the batch norm {batch_statistics[0]!r}"
                                 " normalises with the statistics of each pass (track_running_stats=False); "
                                 "leave eval_batch_size at None")
        self.embedding, self.test_shift, self.test_rotations = embedding, test_shift, test_rotations
        self.eval_batch_size = eval_batch_size

    @abstractmethod
    def scores(self, support: Tensor, support_y: Tensor, query: Tensor, ways: int) -> Tensor:
        """Query logits ``(B, Q, N)`` from support embeddings ``(B, S, D)`` and query embeddings ``(B, Q, D)``."""

    def forward(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, ways: int | None = None) -> Tensor:
        """Logits of the query examples over the support classes.

        Args:
            support_x: ``(S, ...)`` one episode's support inputs, or ``(B, S, ...)`` for ``B`` episodes.
            support_y: integer ``(S,)`` or ``(B, S)`` labels in ``0 .. N−1``, every class present.
            query_x: ``(Q, ...)`` or ``(B, Q, ...)`` query inputs.
            ways: ``N`` (default: one more than the largest support label, which reads
                the labels' device: pass it on an accelerator, so that the step does not
                wait for the device).

        Returns:
            ``(Q, N)`` or ``(B, Q, N)`` logits: ``softmax`` of them is ``p(y | x, S)``.

        Raises:
            ValueError: a class without support examples, labels outside ``0 .. N−1``,
                or support and query sets that do not fit together.
        """
        single = support_y.dim() == 1
        support_x, support_y, query_x, _, ways = self._checked(support_x, support_y, query_x, None, ways)
        logits = self._logits(support_x, support_y, query_x, ways)
        return logits[0] if single else logits

    def loss(self, tasks: TaskBatch) -> dict[str, Tensor]:
        """Mean query cross-entropy (differentiable) and accuracy over one episode or a batch of them.

        The number of ways ``N`` is the length of the episodes' ``classes``; tasks without
        that field (MAML's four-field batches) read it from the support labels, as
        :meth:`forward` does without ``ways``, which waits for an accelerator.

        Returns:
            ``{"loss", "accuracy", "per_task_accuracy"}``: the loss and the accuracy averaged
            over all queries, and each episode's accuracy ``(B,)``.

        Raises:
            ValueError: as :meth:`forward`, or episodes without query examples.
        """
        ways = tasks.classes.shape[-1] if hasattr(tasks, "classes") else None
        support_x, support_y, query_x, query_y, ways = self._checked(tasks.support_x, tasks.support_y,
                                                                     tasks.query_x, tasks.query_y, ways)
        if query_x.shape[1] == 0:
            raise ValueError("the episodes have no query examples: the loss scores the queries, so sample episodes "
                             "with queries >= 1")
        logits = self._logits(support_x, support_y, query_x, ways)
        loss = F.cross_entropy(logits.flatten(0, -2), query_y.flatten())
        per_task = (logits.argmax(-1) == query_y).float().mean(-1).detach()
        return {"loss": loss, "accuracy": per_task.mean(), "per_task_accuracy": per_task}

    def meta_step(self, tasks: TaskBatch, optimizer: torch.optim.Optimizer) -> dict[str, Tensor]:
        """One meta-training step on a batch of episodes; returns the detached loss and accuracy."""
        optimizer.zero_grad(set_to_none=True)
        stats = self.loss(tasks)
        stats["loss"].backward()
        optimizer.step()
        return {"loss": stats["loss"].detach(), "accuracy": stats["accuracy"]}

    @staticmethod
    def _checked(support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor | None,
                 ways: int | None) -> tuple[Tensor, Tensor, Tensor, Tensor | None, int]:
        """The episode(s) with a leading task dimension and the number of ways, or a ValueError."""
        if support_y.dim() == 1:
            support_x, support_y, query_x = support_x.unsqueeze(0), support_y.unsqueeze(0), query_x.unsqueeze(0)
            query_y = None if query_y is None else query_y.unsqueeze(0)
        if support_y.dim() != 2 or support_x.shape[:2] != support_y.shape:
            raise ValueError(f"support_x {tuple(support_x.shape)} and support_y {tuple(support_y.shape)} must be "
                             "(S, ...) and (S,) for one episode, or (B, S, ...) and (B, S) for B episodes")
        if query_x.shape[0] != support_x.shape[0] or query_x.shape[2:] != support_x.shape[2:]:
            raise ValueError(f"query_x {tuple(query_x.shape)} does not fit support_x {tuple(support_x.shape)}: "
                             "give both with the same episodes and the same input shape")
        if query_y is not None and query_y.shape != query_x.shape[:2]:
            raise ValueError(f"query_y {tuple(query_y.shape)} must have one label per query input "
                             f"{tuple(query_x.shape[:2])}")
        _check_label_dtype(support_y, query_y)
        support_y, query_y = support_y.long(), None if query_y is None else query_y.long()
        if ways is None:
            ways = _ways(support_y)
        ways = check_count("ways", ways, 1)
        check_episode_labels(support_y, query_y, ways)
        return support_x, support_y, query_x, query_y, ways

    def _logits(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, ways: int) -> Tensor:
        """Logits ``(B, Q, N)`` of checked, batched episodes."""
        support, query = self.embed_episodes(support_x, query_x)
        return self.scores(support, support_y, query, ways)

    def embed_episodes(self, support_x: Tensor, query_x: Tensor) -> tuple[Tensor, Tensor]:
        """Support and query embeddings ``(B, S, D)`` and ``(B, Q, D)`` of ``(B, S, ...)`` and ``(B, Q, ...)`` inputs.

        All images go through the embedding in one pass. With :meth:`scores`, this lets
        several scoring rules share one embedding of the same episodes. In training
        mode, batch norm then normalises with the statistics of the whole batch of
        episodes, as for one larger batch. In evaluation mode, an embedding whose batch
        norm has no running statistics embeds each episode in a pass of its own, its
        support and query images together (transductive batch norm; Snell et al.'s code
        embeds an episode's images in one pass too), so that no episode's statistics
        reach another's predictions.
        """
        if not self.training and len(support_x) > 1 and _norms_without_running_statistics(self.embedding):
            embedded = [self.embed_episodes(s, q) for s, q in zip(support_x.split(1), query_x.split(1))]
            return torch.cat([s for s, _ in embedded]), torch.cat([q for _, q in embedded])
        tasks, shots = support_x.shape[:2]
        embedded = self.embed(torch.cat([support_x.flatten(0, 1), query_x.flatten(0, 1)]))
        support = embedded[:tasks * shots].unflatten(0, (tasks, shots))
        query = embedded[tasks * shots:].unflatten(0, (tasks, query_x.shape[1]))
        return support, query

    def embed(self, x: Tensor) -> Tensor:
        """``(n, D)`` embeddings of ``(n, ...)`` inputs, with the test-time views that the options ask for.

        Evaluation mode only: averaged over shifted copies with ``test_shift``; with
        ``test_rotations``, ``D`` is four times the embedding's size.

        Raises:
            ValueError: ``test_shift`` or ``test_rotations`` for inputs that are not images
                (fewer than three dimensions), a ``test_shift`` not below the images' height and
                width, or ``test_rotations`` for images that are not square.
        """
        if self.training:
            return self.embedding(x).flatten(1)
        if (self.test_shift or self.test_rotations) and x.dim() < 3:
            raise ValueError(f"test_shift and test_rotations shift and rotate images, (n, [C,] H, W); got inputs of "
                             f"shape {tuple(x.shape)}: leave them at 0 and False for other inputs")
        if self.test_shift >= min(x.shape[-2:]):
            raise ValueError(f"test_shift={self.test_shift} pixels would shift {x.shape[-2]}x{x.shape[-1]} images "
                             f"out of view: use a shift below {min(x.shape[-2:])}")
        if not self.test_rotations:
            return self._mean_over_shifts(x)
        if x.shape[-1] != x.shape[-2]:
            raise ValueError(f"test_rotations needs square images, got {x.shape[-2]}x{x.shape[-1]}")
        # One rotation per pass, so that memory is that of the shifted copies alone; × ½ makes the
        # squared distance between two concatenations the mean of the four frames' squared distances.
        return torch.cat([self._mean_over_shifts(torch.rot90(x, r, dims=(-2, -1))) for r in range(4)], -1) / 2

    def _mean_over_shifts(self, x: Tensor) -> Tensor:
        """``(n, D)``: the embedding, averaged over the shifted copies if ``test_shift``."""
        if not self.test_shift:
            return self._embed_in_passes(x)
        views = shifted_copies(x, self.test_shift)                              # (5, n, ...)
        return self._embed_in_passes(views.flatten(0, 1)).unflatten(0, views.shape[:2]).mean(0)

    def _embed_in_passes(self, x: Tensor) -> Tensor:
        """``(n, D)``: the embedding of ``x``, ``eval_batch_size`` images per pass."""
        if self.eval_batch_size is None:
            return self.embedding(x).flatten(1)
        return torch.cat([self.embedding(part).flatten(1) for part in x.split(self.eval_batch_size)])

    @torch.no_grad()
    def evaluate(self, tasks: TaskBatch) -> dict[str, Tensor]:
        """Query loss and accuracy on a batch of episodes, nothing learned (the caller picks train/eval mode)."""
        return {name: value.detach() for name, value in self.loss(tasks).items()}


class ProtoNet(EpisodicLearner):
    """Prototypical Networks (Snell et al. 2017): logits ``−‖f_φ(x) − c_k‖²`` to the class means ``c_k``.

    With ``refine_steps > 0`` the prototypes are refined by the soft k-means of Ren et
    al. (2018), "Meta-learning for semi-supervised few-shot classification" (ICLR):
    each step weighs every unlabelled example ``x̃_j`` by its current class
    probabilities ``z̃_{j,k}`` and recomputes

        c̃_k = (Σ_i f(x_i)·[y_i = k] + Σ_j z̃_{j,k} f(x̃_j)) / (Σ_i [y_i = k] + Σ_j z̃_{j,k}).

    Ren et al. refine with a separate unlabelled set ``R`` and then score the queries;
    here the queries themselves are the unlabelled examples, in training and in
    testing. This is *transductive*: a query's prediction depends on the other queries
    of its episode, and each query helps build the prototypes it is scored against
    (fair when, as in Omniglot's runs, all the queries are given at once).

    Args:
        embedding: ``f_φ`` (Snell et al.: the four-block Conv4 without a head,
            64-dimensional on 28×28 Omniglot).
        refine_steps: soft k-means steps on the query set (0: the original ProtoNet).
        test_shift, test_rotations, eval_batch_size: test-time views and passes (see
            :class:`EpisodicLearner`).
    """

    def __init__(self, embedding: nn.Module, refine_steps: int = 0, test_shift: int = 0,
                 test_rotations: bool = False, eval_batch_size: int | None = None):
        super().__init__(embedding, test_shift, test_rotations, eval_batch_size)
        self.refine_steps = check_count("refine_steps", refine_steps, 0)

    def scores(self, support: Tensor, support_y: Tensor, query: Tensor, ways: int) -> Tensor:
        prototypes = class_means(support, support_y, ways)                       # (B, N, D)
        if self.refine_steps:
            counts = F.one_hot(support_y, ways).sum(-2).to(support.dtype).unsqueeze(-1)   # (B, N, 1)
            sums = counts * prototypes
            for _ in range(self.refine_steps):
                weights = torch.softmax(-squared_distances(query, prototypes), dim=-1)    # (B, Q, N): z̃_{j,k}
                prototypes = (sums + weights.transpose(-1, -2) @ query) / (counts + weights.sum(-2).unsqueeze(-1))
        return -squared_distances(query, prototypes)


class MatchingNet(EpisodicLearner):
    """Matching Networks (Vinyals et al. 2016), basic form: cosine attention over the support set.

    The logits are ``log P(y = k | x̂, S) = log Σ_{i: y_i = k} a(x̂, x_i)``, computed
    as ``logsumexp`` of the similarities of class ``k`` minus that of all of them.

    Args:
        embedding: ``f = g``, shared by support and query examples.
        scale: multiplies the cosine similarities before the softmax (1 in the
            paper; a larger value sharpens the attention, which the cosine's
            range [−1, 1] otherwise keeps flat).
        test_shift, test_rotations, eval_batch_size: test-time views and passes (see
            :class:`EpisodicLearner`). The cosine of two side-by-side embeddings is not
            the mean of the four frames' cosines: each frame counts by its norm.

    Raises:
        ValueError: a ``scale`` that is not a positive, finite number, or options that
            :class:`EpisodicLearner` refuses.
    """

    def __init__(self, embedding: nn.Module, scale: float = 1.0, test_shift: int = 0,
                 test_rotations: bool = False, eval_batch_size: int | None = None):
        super().__init__(embedding, test_shift, test_rotations, eval_batch_size)
        self.scale = check_positive("scale", scale)

    def scores(self, support: Tensor, support_y: Tensor, query: Tensor, ways: int) -> Tensor:
        similarity = self.scale * F.normalize(query, dim=-1) @ F.normalize(support, dim=-1).transpose(-1, -2)
        in_class = F.one_hot(support_y, ways).to(similarity.dtype).log()      # (B, S, N): 0 or −inf
        per_class = torch.logsumexp(similarity.unsqueeze(-1) + in_class.unsqueeze(-3), dim=-2)   # (B, Q, N)
        return per_class - torch.logsumexp(similarity, dim=-1, keepdim=True)
