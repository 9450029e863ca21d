"""Meta-training throughput and peak memory of lowlearn's MAML against ``higher``.

A MAML workload on Omniglot's shapes, after Finn et al. (2017): Conv4 (64 channels,
transductive batch norm) on 28×28 images, 5-way 1-shot, second order, a meta-batch
of 32 tasks and α = 0.4 (their 5-way Omniglot settings), Adam on the initialisation;
but 5 inner SGD steps and 15 queries per class, where they meta-trained 5-way
Omniglot with one step (five for 20-way Omniglot and for mini-ImageNet) and kept 15
queries per class for mini-ImageNet. More inner steps weigh the differentiable inner
loop, which is what the implementations differ in. Every implementation gets the
same model, tasks and meta-optimizer: lowlearn's MAML adapting one task after
another, the same adapting all tasks at once (``tasks_at_once``, one grouped kernel
per layer for the whole meta-batch), and ``higher``, which runs its differentiable
SGD in ``innerloop_ctx`` as in its MAML example.
Throughput is tasks per second, timed in interleaved blocks; its ratio to
``higher``'s is the median of the blocks' ratios
(:func:`~lowlearn.bench.timing.paired_ratio`). Peak memory is
measured on CUDA, as ``torch.cuda.max_memory_allocated`` during one meta-step.
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from lowlearn import cli
from lowlearn.data.episodes import Episode, random_episodes
from lowlearn.meta import MAML
from lowlearn.models import Conv4

from .timing import (add_device_argument, cuda_peak_bytes, departures, environment, held_at, interleaved_rounds,
                     judged, medians, middle_half, paired_ratio, resolve_device)

IMPLEMENTATIONS = ("lowlearn", "lowlearn batched", "higher")
WORKLOAD = {"tasks": 32, "ways": 5, "shots": 1, "queries": 15, "steps": 5}
"""The default workload (the module docstring's); the goals (:func:`goals`) are held at it."""


def import_higher():
    """The peer, ``higher``; a SystemExit that says how to install it where it is missing.

    ``pip install "lowlearn[bench]"`` installs it with lowlearn.
    """
    try:
        import higher
    except ImportError:
        raise SystemExit('the maml benchmark times lowlearn against higher: pip install higher '
                         '(or pip install "lowlearn[bench]")') from None
    return higher


def make_step(name: str, model: torch.nn.Module, tasks: Episode, steps: int, inner_lr: float):
    """One meta-training step of ``name`` on ``tasks``."""
    meta_optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    if name.startswith("lowlearn"):
        at_once = tasks.support_x.shape[0] if name == "lowlearn batched" else 1
        maml = MAML(model, inner_lr, steps, tasks_at_once=at_once)
        return lambda: maml.meta_step(tasks, meta_optimizer)
    higher = import_higher()
    inner = torch.optim.SGD(model.parameters(), lr=inner_lr)

    def step() -> None:
        meta_optimizer.zero_grad()
        count = tasks.support_x.shape[0]
        for j in range(count):
            with higher.innerloop_ctx(model, inner, copy_initial_weights=False) as (fmodel, diffopt):
                for _ in range(steps):
                    diffopt.step(F.cross_entropy(fmodel(tasks.support_x[j]), tasks.support_y[j]))
                (F.cross_entropy(fmodel(tasks.query_x[j]), tasks.query_y[j]) / count).backward()
        meta_optimizer.step()
    return step


def run(tasks: int = WORKLOAD["tasks"], ways: int = WORKLOAD["ways"], shots: int = WORKLOAD["shots"],
        queries: int = WORKLOAD["queries"], steps: int = WORKLOAD["steps"], inner_lr: float = 0.4, iterations: int = 2,
        repeats: int = 3, device: str | None = None) -> dict:
    """``{"rounds": {implementation: seconds per meta-step in each interleaved round}, "seconds": their medians,
    "peak_bytes": {...} (CUDA only, else empty)}``."""
    device = resolve_device(device)
    torch.manual_seed(0)
    model = Conv4(1, ways, running_stats=False).to(device)
    batch = random_episodes(tasks, ways, shots, queries, device=device)

    def fresh_steps() -> dict:
        return {name: make_step(name, copy.deepcopy(model), batch, steps, inner_lr) for name in IMPLEMENTATIONS}

    rounds = interleaved_rounds(fresh_steps(), device=device, iterations=iterations, repeats=repeats, warmup=1)
    memory = {}
    if device.type == "cuda":
        for name, step in fresh_steps().items():
            step()                                      # the fresh optimizer's state exists from now on
            memory[name] = cuda_peak_bytes(step, device)
    return {"rounds": rounds, "seconds": medians(rounds), "peak_bytes": memory}


def goal_settings(sizes: Mapping[str, object]) -> dict[str, tuple[float, float]]:
    """``{setting: (the value in ``sizes``, the goals')}`` for :func:`~lowlearn.bench.timing.departures`: the goals
    are held at :data:`WORKLOAD` (``sizes`` as :func:`run` takes them; missing: the defaults)."""
    return {key: (sizes.get(key, held), held) for key, held in WORKLOAD.items()}


def goals(device: torch.device) -> dict[str, float]:
    """``{implementation: goal}``: the throughput (in multiples of higher's) each lowlearn path is held to.

    Each path is held where it is meant to run. On a GPU the batched path is held to
    3×; the loop has no goal there, since it launches the same small kernels one task
    at a time as higher does. On a CPU the loop, lowlearn's default, is held to
    higher's throughput; the batched path has no goal there: at :data:`WORKLOAD` its
    activations for all 32 tasks take hundreds of MB, far beyond a CPU's caches, so
    it runs slower than the loop, which works on one task's (it pays on a CPU only
    for smaller meta-batches, as in the cpu profile of the optimisation_based chapter).
    """
    return {"lowlearn batched": 3.0} if device.type == "cuda" else {"lowlearn": 1.0}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lowlearn.bench maml", description=__doc__)
    parser.add_argument("--tasks", type=cli.positive_int, default=WORKLOAD["tasks"])
    parser.add_argument("--ways", type=cli.positive_int, default=WORKLOAD["ways"])
    parser.add_argument("--shots", type=cli.positive_int, default=WORKLOAD["shots"])
    parser.add_argument("--queries", type=cli.positive_int, default=WORKLOAD["queries"])
    parser.add_argument("--steps", type=cli.positive_int, default=WORKLOAD["steps"], help="inner steps")
    parser.add_argument("--inner-lr", type=cli.positive_number, default=0.4, help="α, the inner step size")
    parser.add_argument("--iterations", type=cli.positive_int, default=2, help="meta-steps per timed block")
    parser.add_argument("--repeats", type=cli.positive_int, default=3)
    add_device_argument(parser)
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    result = run(args.tasks, args.ways, args.shots, args.queries, args.steps, args.inner_lr, args.iterations,
                 args.repeats, device)
    times, memory = result["seconds"], result["peak_bytes"]
    speedups = {name: paired_ratio(result["rounds"], "higher", name) for name in IMPLEMENTATIONS}
    print(f"MAML meta-training, Conv4, {args.ways}-way {args.shots}-shot, {args.queries} queries, {args.steps} inner "
          f"steps, {args.tasks} tasks per meta-step, {environment(device)}")
    print(f"median of {args.repeats} interleaved blocks of {args.iterations} meta-steps; the throughput ratio is the "
          "median of the blocks' ratios, beside their middle half")
    print(f"{'implementation':<17} {'tasks/s':>9} {'vs higher':>10} {'middle half':>12} {'peak MiB':>9} "
          f"{'vs higher':>10}")
    for name in IMPLEMENTATIONS:
        rate, speedup = args.tasks / times[name], speedups[name]
        line = f"{name:<17} {rate:9.2f} {speedup.median:9.2f}x {middle_half(speedup.low, speedup.high):>12}"
        if memory:
            line += f" {memory[name] / 2**20:9.1f} {memory[name] / max(memory['higher'], 1):9.2f}x"
        print(line)
    if not memory:
        print("peak memory: measured on CUDA only (the CPU allocator keeps no peak statistics)")
    settings = goal_settings(vars(args))
    for name, goal in goals(device).items():
        print(f"goal: {name} throughput >= {goal:g}x higher's on {device.type} at {held_at(settings)}: "
              f"{judged(speedups[name], goal, higher_is_better=True, not_held=departures(settings))}")
