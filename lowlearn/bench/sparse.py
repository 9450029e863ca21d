"""Inference time of exported sparse layers against the dense layer, as the density falls.

One ``features × features`` Linear layer, a batch of inputs, inference mode. At each
density ``d`` the same random layer is made sparse in the ways of
:mod:`lowlearn.sparse.export`, and each is timed against the dense layer in the
same interleaved rounds:

* ``csr``: unstructured magnitude pruning to density ``d``, exported to CSR;
* ``channels``: the ``d`` fraction of output units of largest norm kept, cut out
  into a smaller dense layer (:func:`lowlearn.sparse.export.compact`, as for a
  hidden layer; the next layer, which also shrinks, is not timed);
* ``low rank``: rank ``r = d·features/2``, the same number of weights, as two thin
  layers;
* ``2:4`` (CUDA with sparse tensor cores only): 2:4 pruning in fp16, against the
  dense layer in fp16, at ``d = 0.5``; on this layer and batch, and on a large
  product (``TWO_FOUR_LARGE``), where the fixed host time of each call of torch's
  cuSPARSELt path is small beside the product itself.

Each row gives the ideal speed-up (the ratio of multiply-accumulates) beside the
measured one: the median over the rounds of dense time / time within a round,
with the middle half of those ratios (:func:`~lowlearn.bench.timing.paired_ratio`).
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Sequence

import torch
from torch import nn

from lowlearn import cli
from lowlearn.lowrank import LowRankLinear
from lowlearn.sparse import prune, prune_channels, prune_nm, scores
from lowlearn.sparse.export import SemiStructuredLinear, compact, export, semi_structured_unavailable
from lowlearn.sparse.prune import kept_count

from .timing import (Ratio, add_device_argument, departures, environment, held_at, interleaved_rounds, judged, medians,
                     middle_half, paired_ratio, resolve_device)

DENSITIES = (0.5, 0.2, 0.1, 0.05, 0.02, 0.01)
SIZE = (4096, 64)
"""``(features, batch size)`` of the default layer and batch, the ones the CSR goal (>= :data:`CSR_GOAL` x dense
at density :data:`CSR_GOAL_DENSITY` on a CPU) is held at."""
CSR_GOAL = 3.0
"""The speed-up over dense that CSR is held to on a CPU, at :data:`CSR_GOAL_DENSITY` and :data:`SIZE`."""
CSR_GOAL_DENSITY = 0.05
"""The density (95% sparsity) at which CSR is held to :data:`CSR_GOAL`."""
TWO_FOUR_LARGE = (8192, 16384)
"""``(features, batch size)`` of the large 2:4 product, the one the goal (>= 1.2x dense) is held to: a
layer of a large language model and a batch of tokens. (On an H100 with torch 2.11, the 2:4 product of a
4096-feature layer and a batch of 64 took 0.03 ms on the GPU and about 0.9 ms on the host, in
``torch._cslt_sparse_mm``.)"""


def _variants(dense: nn.Sequential, density: float) -> dict[str, tuple[nn.Module, float]]:
    """``{name: (exported model, ideal speed-up)}`` at one density."""
    features = dense[0].in_features
    unstructured = copy.deepcopy(dense)
    prune(unstructured, scores.magnitude(unstructured), density)
    # A hidden layer loses its pruned units; compact() needs the next layer to cut them out of, then we keep ours.
    channels = nn.Sequential(copy.deepcopy(dense[0]), nn.Linear(features, 1)).to(dense[0].weight.device)
    prune_channels(channels, density, layers=["0"])
    rank = max(1, round(density * features / 2))
    low_rank = nn.Sequential(LowRankLinear.from_linear(dense[0], rank=rank))
    return {"csr": (export(unstructured, "csr"), features**2 / kept_count(density, features**2)),
            "channels": (compact(channels)[:1], features / kept_count(density, features)),
            "low rank": (export(low_rank, "dense"), features / (2 * rank))}


def run(features: int = SIZE[0], batch_size: int = SIZE[1], densities: tuple[float, ...] = DENSITIES,
        iterations: int = 5, repeats: int = 5, warmup: int = 2, device: str | None = None,
        two_four_large: tuple[int, int] | None = TWO_FOUR_LARGE) -> list[dict]:
    """Time every variant at every density; one row per (format, density) with the dense time beside it.

    Every row has the layer's ``features`` and the ``batch_size``; on CUDA the 2:4 rows are at
    ``(features, batch_size)`` and at ``two_four_large`` (``None``: not that one).
    """
    device = resolve_device(device)
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(features, features)).to(device).eval()
    x = torch.randn(batch_size, features, device=device)
    rows = []
    with torch.inference_mode():
        for density in densities:
            variants = _variants(dense, density)
            steps = {"dense": lambda: dense(x)}
            steps |= {name: (lambda m=model: m(x)) for name, (model, _) in variants.items()}
            rounds = interleaved_rounds(steps, device=device, iterations=iterations, repeats=repeats, warmup=warmup)
            rows += [_row(name, density, ideal, rounds, features, batch_size) for name, (_, ideal) in variants.items()]
        rows += _two_four(dense, x, iterations, repeats, warmup, device)
        if device.type == "cuda" and two_four_large not in (None, (features, batch_size)):
            large_features, large_batch = two_four_large
            torch.manual_seed(0)
            large = nn.Sequential(nn.Linear(large_features, large_features)).to(device).eval()
            rows += _two_four(large, torch.randn(large_batch, large_features, device=device), iterations, repeats,
                              warmup, device)
    return rows


def _row(name: str, density: float, ideal: float, rounds: dict[str, list[float]], features: int,
         batch_size: int) -> dict:
    """The row of variant ``name``: its speed-up over ``"dense"`` in the same rounds, with the middle half."""
    times, speedup = medians(rounds), paired_ratio(rounds, "dense", name)
    return {"format": name, "density": density, "features": features, "batch_size": batch_size,
            "ideal_speedup": ideal, "speedup": speedup.median, "spread": [speedup.low, speedup.high],
            "ms": times[name] * 1e3, "dense_ms": times["dense"] * 1e3}


def _two_four(dense: nn.Sequential, x: torch.Tensor, iterations: int, repeats: int, warmup: int,
              device: torch.device) -> list[dict]:
    """The 2:4 row, where the device runs 2:4 sparse kernels on this layer's shape (none otherwise).

    :func:`~lowlearn.sparse.export.export` keeps a layer dense (and warns why) when
    torch's kernels refuse its shape; that layer is not timed as 2:4.
    """
    features = dense[0].in_features
    if device.type != "cuda" or features % 4:
        return []
    half = copy.deepcopy(dense).half()
    sparse = copy.deepcopy(half)
    prune_nm(sparse, 2, 4)
    if semi_structured_unavailable(sparse[0]) is not None:
        return []
    exported, xh = export(sparse, "2:4"), x.half()
    if not isinstance(exported[0], SemiStructuredLinear):
        return []
    rounds = interleaved_rounds({"dense": lambda: half(xh), "2:4 (fp16)": lambda: exported(xh)}, device=device,
                                iterations=iterations, repeats=repeats, warmup=warmup)
    return [_row("2:4 (fp16)", 0.5, 2.0, rounds, features, len(x))]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lowlearn.bench sparse", description=__doc__)
    parser.add_argument("--features", type=cli.positive_int, default=SIZE[0])
    parser.add_argument("--batch-size", type=cli.positive_int, default=SIZE[1])
    parser.add_argument("--densities", type=cli.fractions, default=DENSITIES,
                        help="comma-separated, each in (0, 1]")
    parser.add_argument("--iterations", type=cli.positive_int, default=5, help="calls per timed block")
    parser.add_argument("--repeats", type=cli.positive_int, default=5, help="interleaved timed blocks per variant")
    add_device_argument(parser)
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    rows = run(args.features, args.batch_size, tuple(args.densities), args.iterations, args.repeats, device=device)
    print(f"Linear {args.features}x{args.features}, batch {args.batch_size}, inference, {environment(device)}")
    print(f"median of {args.repeats} interleaved blocks of {args.iterations} calls; speed-up = dense time / time in "
          "each block: their median, beside their middle half")
    print(f"{'format':<12} {'density':>8} {'ms':>9} {'dense ms':>9} {'ideal':>7} {'speed-up':>9} {'middle half':>12}")
    for row in rows:
        spread = middle_half(*row["spread"])
        size = "" if row["features"] == args.features else f"  ({row['features']} features, batch {row['batch_size']})"
        print(f"{row['format']:<12} {row['density']:8.3f} {row['ms']:9.3f} {row['dense_ms']:9.3f} "
              f"{row['ideal_speedup']:6.1f}x {row['speedup']:8.2f}x {spread:>12}{size}")
    settings = {"features": (args.features, SIZE[0]), "batch": (args.batch_size, SIZE[1])}
    for row in rows:
        if _csr_goal_case(row, device):
            print(f"goal: CSR at {1 - CSR_GOAL_DENSITY:.0%} sparsity >= {CSR_GOAL:g}x dense on CPU at "
                  f"{held_at(settings)}: {_judged(row, CSR_GOAL, departures(settings))}")
        elif (target := goal(row, device)) is not None:
            print(f"goal: {row['format']} >= {target:g}x dense on a GPU for a {row['features']}-feature layer and a "
                  f"batch of {row['batch_size']}: {_judged(row, target)}")
    if not any(row["format"].startswith("2:4") for row in rows):
        print("2:4: not measured (needs a CUDA GPU with 2:4 sparse kernels that take --features, a multiple of 4)")


def goal(row: dict, device: torch.device, two_four_large: tuple[int, int] | None = TWO_FOUR_LARGE) -> float | None:
    """The speed-up over dense a row of :func:`run` is held to on ``device``, or ``None``.

    CSR at density :data:`CSR_GOAL_DENSITY` on a CPU, on the layer and batch :data:`SIZE`:
    :data:`CSR_GOAL`; 2:4 on the product ``two_four_large``: 1.2×.
    """
    if _csr_goal_case(row, device):
        return CSR_GOAL if (row["features"], row["batch_size"]) == SIZE else None
    if row["format"].startswith("2:4") and (row["features"], row["batch_size"]) == two_four_large:
        return 1.2
    return None


def _csr_goal_case(row: dict, device: torch.device) -> bool:
    """Whether ``row`` is the CSR case that has a goal, at some layer size."""
    return row["format"] == "csr" and row["density"] == CSR_GOAL_DENSITY and device.type == "cpu"


def _judged(row: dict, goal: float, not_held: Sequence[str] = ()) -> str:
    """A row's speed-up, its middle half and its verdict against ``goal``, as a goal line prints them."""
    return judged(Ratio(row["speedup"], *row["spread"]), goal, higher_is_better=True, not_held=not_held)
