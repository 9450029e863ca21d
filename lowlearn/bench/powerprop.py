"""Training-step time with Powerpropagation, against the same network without it.

LeNet-300-100 with identical initial function; a step is forward, cross-entropy,
backward and an optimizer step on a fixed batch. Powerprop adds a power of every
weight in the forward pass and its derivative's factor in the backward pass. The
optimiser-aware update (:class:`lowlearn.powerprop.PowerPropOptimizer`) needs no
factor in the backward pass (it steps on ``∂L/∂θ``), but its step makes six
element-wise passes over each weight to map the update back to ``φ``. Each is
compared with its own baseline: SGD with plain SGD, the optimiser-aware Adam with
plain Adam.

On a CUDA device every case is also timed with its step captured in a CUDA graph
(``"<case>, CUDA graph"``, against its baseline's graph, Adam with
``capturable=True``), which measures the work on the GPU rather than the host's
launches (see ``masks``); the goal is judged for both.

The page faults per step are printed beside the times (see ``masks``).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F

from lowlearn import cli
from lowlearn.models import MLP
from lowlearn.powerprop import PowerPropOptimizer, check_alpha, powerprop

from .timing import (GRAPH, add_device_argument, cuda_graphed, departures, environment, fixed_batch, held_at, judged,
                     paired_ratio, print_steps, resolve_device, timed_steps, variants)

CASES = ("SGD", "Powerprop, SGD", "Adam", "Powerprop, optimiser-aware Adam")
BASELINE = {"Powerprop, SGD": "SGD", "Powerprop, optimiser-aware Adam": "Adam"}
GOAL = 1.15
"""The most time per step that each Powerprop case is held to, as a multiple of its baseline's, at the
default :data:`BATCH_SIZE` and any α > 1 (α = 1 is the baseline itself)."""
BATCH_SIZE = 60
"""The default number of training examples per step, and the batch :data:`GOAL` is held at."""


def goal_settings(sizes: Mapping[str, object]) -> dict[str, tuple[float, float]]:
    """``{setting: (the value in ``sizes``, the goal's)}`` for :func:`~lowlearn.bench.timing.departures`: the goal is
    held at :data:`BATCH_SIZE` (``sizes`` as :func:`run` takes them), and any α > 1."""
    return {"batch": (sizes.get("batch_size", BATCH_SIZE), BATCH_SIZE)}


def departures_from_the_goal(sizes: Mapping[str, object]) -> list[str]:
    """What in ``sizes`` the goal is not held at: :func:`goal_settings`' departures, and α = 1 (the baseline)."""
    return departures(goal_settings(sizes)) + (["α = 1, the baseline itself"] if sizes.get("alpha") == 1 else [])


def build_steps(alpha: float, batch_size: int, device: torch.device) -> dict[str, tuple]:
    """``{case: (training-step function, its model)}``."""
    x, y = fixed_batch(batch_size, 784, device)
    return {case: build_case(case, alpha, x, y) for case in CASES}


def build_case(case: str, alpha: float, x: torch.Tensor, y: torch.Tensor,
               capturable: bool = False) -> tuple[Callable[[], None], torch.nn.Module]:
    """``case``'s (training-step function, its model) on the batch ``(x, y)``; ``capturable`` builds Adam for a
    CUDA graph."""
    torch.manual_seed(0)
    model = MLP().to(x.device)
    if case.startswith("Powerprop"):
        powerprop(model, alpha)
    if "Adam" in case:
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, capturable=capturable)
        if case.startswith("Powerprop"):
            optimizer = PowerPropOptimizer(optimizer, model)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    return step, model


def run(alpha: float = 3.0, batch_size: int = BATCH_SIZE, iterations: int = 20, repeats: int = 70,
        device: str | None = None) -> dict[str, dict]:
    """Time the cases, then count their page faults over one more block of steps.

    Returns:
        :func:`~lowlearn.bench.timing.timed_steps`' result.
    """
    device = resolve_device(device)
    steps = {case: step for case, (step, _) in build_steps(alpha, batch_size, device).items()}
    if device.type == "cuda":                 # the same cases again, each step captured in a CUDA graph
        x, y = fixed_batch(batch_size, 784, device)
        steps |= {case + GRAPH: cuda_graphed(lambda case=case: build_case(case, alpha, x, y, capturable=True)[0],
                                             device) for case in CASES}
    return timed_steps(steps, device=device, iterations=iterations, repeats=repeats, warmup=20)


def baseline(case: str) -> str:
    """The case that ``case`` is measured against: its :data:`BASELINE`, captured in a CUDA graph if it is."""
    graphed = case.endswith(GRAPH)
    plain = case.removesuffix(GRAPH)
    return BASELINE.get(plain, plain) + (GRAPH if graphed else "")


def judged_cases(rounds: Mapping[str, list[float]]) -> list[str]:
    """The cases of ``rounds`` that :data:`GOAL` is held to: each of :data:`BASELINE`, eager and, on a GPU, graphed."""
    return [case + suffix for suffix in variants(rounds, "SGD") for case in BASELINE]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lowlearn.bench powerprop", description=__doc__)
    parser.add_argument("--alpha", type=float, default=3.0)
    parser.add_argument("--batch-size", type=cli.positive_int, default=BATCH_SIZE)
    parser.add_argument("--iterations", type=cli.positive_int, default=20, help="training steps per timed block")
    parser.add_argument("--repeats", type=cli.positive_int, default=70, help="interleaved timed blocks per case")
    add_device_argument(parser)
    args = parser.parse_args(argv)
    try:
        check_alpha(args.alpha)
    except ValueError as error:
        parser.error(f"--alpha: {error}")
    device = resolve_device(args.device)
    result = run(args.alpha, args.batch_size, args.iterations, args.repeats, device)
    print(f"LeNet-300-100 training step, batch {args.batch_size}, alpha {args.alpha:g}, {environment(device)}")
    print(f"median of {args.repeats} interleaved blocks of {args.iterations} steps, in shuffled order; the ratio to "
          "the baseline is the median of the blocks' ratios, beside their middle half")
    print_steps(result, baseline, "case", "vs baseline")
    settings = goal_settings(vars(args))
    not_held = departures_from_the_goal(vars(args))
    for case in judged_cases(result["rounds"]):
        base = baseline(case)
        ratio = paired_ratio(result["rounds"], case, base)
        print(f"goal: {case} / {base} <= {GOAL:.2f} at {held_at(settings)}, α > 1: "
              f"{judged(ratio, GOAL, not_held=not_held)}")
