"""Meta-training and meta-testing on episodes, for every learner with ``meta_step`` and ``evaluate``.

Episodic training (Vinyals et al. 2016, "Matching networks for one shot
learning") draws a batch of N-way K-shot episodes per step, shaped like the test
tasks, and takes one meta-step on them. :func:`meta_train` is that loop for any
learner of :mod:`lowlearn.meta` (:class:`~lowlearn.meta.metric.ProtoNet`,
:class:`~lowlearn.meta.metric.MatchingNet`, :class:`~lowlearn.meta.maml.MAML` and
its variants); :func:`episode_accuracies` scores a learner on fixed test
episodes, and :func:`lowlearn.stats.mean_and_ci` summarises the scores with a 95%
confidence interval, the way few-shot papers report accuracy.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor

from lowlearn.checks import check_count
from lowlearn.data.episodes import Episode, EpisodeSampler


class MetaLearner(Protocol):
    """A learner that takes one meta-training step on a batch of episodes."""

    def meta_step(self, tasks: Episode, optimizer: torch.optim.Optimizer) -> dict[str, Tensor]: ...


def meta_train(learner: MetaLearner, sampler: EpisodeSampler, optimizer: torch.optim.Optimizer, steps: int, *,
               batch: int = 1, transform: Callable[[Tensor], Tensor] | None = None,
               scheduler: torch.optim.lr_scheduler.LRScheduler | None = None, log_every: int = 50,
               record: str = "loss") -> list[float]:
    """Meta-train ``learner`` for ``steps`` meta-steps of ``batch`` episodes each.

    Args:
        learner: anything with ``meta_step(tasks, optimizer)`` (put it in training mode first).
        sampler: draws the training episodes (on the device of its data).
        optimizer: the meta-optimizer, built on the learner's parameters.
        steps: meta-steps.
        batch: episodes per meta-step (the meta-batch).
        transform: applied to the support and query inputs of every batch (data augmentation).
        scheduler: stepped after every meta-step.
        log_every: meta-steps between reads of the recorded statistic (each read waits for the device).
        record: the statistic of ``meta_step`` to record, ``"loss"`` or another it reports
            (e.g. ``"accuracy"`` for MAML and the metric learners).

    Returns:
        The recorded statistic every ``log_every`` steps (mean of the steps since the last read).

    Raises:
        ValueError: ``steps`` below 0, or ``batch`` or ``log_every`` below 1.
        KeyError: ``record`` is not a statistic the learner's ``meta_step`` reports (found at the first step).
        FloatingPointError: the loss became NaN or infinite (checked whatever is recorded).
    """
    check_count("steps", steps, 0)
    check_count("batch", batch, 1)
    check_count("log_every", log_every, 1)
    recorded, running = [], None
    for step in range(1, steps + 1):
        tasks = sampler.sample(batch)
        if transform is not None:
            tasks = tasks._replace(support_x=transform(tasks.support_x), query_x=transform(tasks.query_x))
        stats = learner.meta_step(tasks, optimizer)
        if record not in stats:
            raise KeyError(f"{type(learner).__name__}.meta_step reports {sorted(stats)}, not {record!r}: pass one of "
                           "them as record=")
        values = torch.stack([stats["loss"].detach(), stats[record].detach().to(stats["loss"].dtype)])
        running = values if running is None else running + values
        if scheduler is not None:
            scheduler.step()
        if step % log_every == 0 or step == steps:
            loss, mean = (running / (step - log_every * len(recorded))).tolist()      # one read of the device
            if not math.isfinite(loss):
                raise FloatingPointError(f"the meta-training loss became {loss} by step {step}; lower the "
                                         "learning rate, or check the episodes: a class without support examples "
                                         "gives NaN (labels on an accelerator are not checked)")
            recorded.append(mean)
            running = None
    return recorded


def episode_accuracies(evaluate: Callable[[Episode], Tensor], sampler: EpisodeSampler, episodes: int,
                       batch: int = 100) -> Tensor:
    """Accuracy of each of ``episodes`` test episodes, ``(episodes,)`` on the sampler's device.

    The learner's mode is the caller's: put it in evaluation mode first (in training
    mode batch norm normalises each call's episodes together, so the accuracies depend
    on ``batch``, and it updates its running statistics).

    The episodes are ``sampler.sample(batch)`` calls, then one for the rest. So a sampler
    with the same seed and the same ``batch`` gives the same episodes, and a count that
    is a multiple of ``batch`` gives the first episodes of any larger count (the black-box
    chapter scores MAML on the first of the metric learners' episodes this way). A
    shorter last call draws differently from the start of a full one.

    Args:
        evaluate: maps a batch of episodes to each episode's query accuracy ``(B,)``, e.g.
            ``lambda tasks: protonet.evaluate(tasks)["per_task_accuracy"]``.
        sampler: draws the test episodes (seed it for the same episodes in every comparison).
        episodes: how many.
        batch: episodes per call of ``evaluate`` and of ``sampler.sample``.

    Raises:
        ValueError: ``episodes`` or ``batch`` below 1.
    """
    check_count("episodes", episodes, 1)
    check_count("batch", batch, 1)
    chunks = [evaluate(sampler.sample(min(batch, episodes - start))) for start in range(0, episodes, batch)]
    return torch.cat(chunks)
