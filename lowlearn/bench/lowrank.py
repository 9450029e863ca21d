"""Training-step time and memory of DLRT against the dense network, as the width grows.

The network is ``w → w → w → 10`` (two hidden layers of width ``w``, ReLU); DLRT
holds the two ``w × w`` hidden layers at a fixed rank ``r`` (the fixed-rank
integrator of :class:`~lowlearn.lowrank.dlrt.DLRT`: its K/L pass, its S-step pass and the
QR factorisations), the dense network is trained with plain SGD. With ``--tol ϑ`` DLRT
is the rank-adaptive integrator instead, started at rank ``r`` and capped there
(``r_max = r``): one pass, QR factorisations of ``2r`` columns and the SVD of a
``2r × 2r`` core per layer and step. ``--tol 0`` keeps the rank at ``r`` throughout, so
that the two integrators are timed at the same rank; a larger ``ϑ`` lets it fall while it is
timed (the ranks at the end are printed). Time is the
median per step of interleaved blocks, and the time ratio the median of the blocks'
ratios (:func:`~lowlearn.bench.timing.paired_ratio`). Memory is what a step holds: parameters,
gradients, optimizer state and the activations saved for backward
(:func:`lowlearn.cost.training_memory`); on CUDA also the measured peak of one step
beyond what was allocated before it (``torch.cuda.max_memory_allocated``: the step's
activations, gradients and temporaries, DLRT's included; not the other model's memory).

The goal, DLRT below dense in time and in memory, is held from width 1024 at rank
<= 64, and on a GPU only from a batch of :data:`GPU_BATCH` (:func:`goal`).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from lowlearn import cli
from lowlearn.cost import training_memory
from lowlearn.lowrank import DLRT, to_low_rank
from lowlearn.lowrank.layers import check_tolerance

from .timing import (VERDICT_WORDS, add_device_argument, cuda_peak_bytes, decimals, environment, fixed_batch,
                     interleaved_rounds, medians, middle_half, paired_ratio, resolve_device, verdict)

GPU_BATCH = 4096
"""On a GPU the goal is held from this batch on. At the default batch of 128 a GPU step of these layers is kernel
launches and the latency of four small QR factorisations, not the multiply-adds that DLRT saves: measured on an
H100, width 4096, the dense step took 1.0 ms and DLRT's 8.1 ms at batch 128, and 14.1 ms and 6.8 ms at batch 4096."""


def build(width: int, rank: int | None, device: torch.device, tol: float | None = None):
    """``(model, optimizer)``: dense with SGD (``rank=None``), or low-rank with DLRT, at fixed rank (``tol=None``)
    or rank-adaptive with tolerance ``tol`` and ranks at most ``rank``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                          nn.Linear(width, 10)).to(device)
    if rank is None:
        return model, torch.optim.SGD(model.parameters(), lr=0.01)
    to_low_rank(model, ["0", "2"], rank=rank)
    if tol is None:
        return model, DLRT(model, lr=0.01)
    return model, DLRT(model, lr=0.01, tol=tol, r_max=rank)


def _step(model, optimizer, x, y):
    def step() -> None:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        if getattr(optimizer, "needs_closure", False):             # DLRT at fixed rank: the S-step's pass
            optimizer.step(lambda: F.cross_entropy(model(x), y))
        else:
            optimizer.step()
    return step


def run(widths=(512, 1024, 2048, 4096), rank: int = 32, batch_size: int = 128, iterations: int = 3,
        repeats: int = 15, device: str | None = None, tol: float | None = None) -> list[dict]:
    """One row per width: its rank and batch size, seconds per step and bytes, dense and DLRT, the time ratio
    DLRT / dense (a ``Ratio``), and DLRT's ranks after the timing (``{layer name: rank}``)."""
    device = resolve_device(device)
    rows = []
    for width in widths:
        x, y = fixed_batch(batch_size, width, device)
        built = {"dense": build(width, None, device), "dlrt": build(width, rank, device, tol)}
        steps = {name: _step(model, opt, x, y) for name, (model, opt) in built.items()}
        rounds = interleaved_rounds(steps, device=device, iterations=iterations, repeats=repeats, warmup=1)
        times = medians(rounds)
        row = {"width": width, "rank": rank, "batch_size": batch_size,
               "time_ratio": paired_ratio(rounds, "dlrt", "dense"), "ranks": built["dlrt"][1].ranks()}
        for name, (model, opt) in built.items():
            memory = training_memory(model, opt, (x, y), F.cross_entropy)
            model.zero_grad(set_to_none=True)        # the step's gradients count in its peak, not in the base
            row[name] = {"seconds": times[name], "bytes": memory.total,
                         "cuda_peak": cuda_peak_bytes(steps[name], device)}
        rows.append(row)
    return rows


def goal(row: dict, device: torch.device) -> float | None:
    """The ratio DLRT / dense, of time and of memory, that a row of :func:`run` is held to on ``device``, or ``None``.

    At most 1 from width 1024 at rank <= 64; on a GPU only from a batch of :data:`GPU_BATCH`.
    """
    if row["width"] < 1024 or row["rank"] > 64 or (device.type == "cuda" and row["batch_size"] < GPU_BATCH):
        return None
    return 1.0


def main(argv: list[str] | None = None) -> None:
    """``python -m lowlearn.bench lowrank`` with the options ``argv`` (default ``sys.argv[1:]``): time and print
    the table of :func:`run` and the verdict on the :func:`goal`."""
    parser = argparse.ArgumentParser(prog="python -m lowlearn.bench lowrank", description=__doc__)
    parser.add_argument("--widths", type=cli.positive_int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--rank", type=cli.positive_int, default=32)
    parser.add_argument("--tol", type=float, default=None,
                        help="rank-adaptive DLRT with this relative tolerance, in [0, 1), and ranks at most --rank "
                             "(default: fixed rank)")
    parser.add_argument("--batch-size", type=cli.positive_int, default=128)
    parser.add_argument("--iterations", type=cli.positive_int, default=3, help="training steps per timed block")
    parser.add_argument("--repeats", type=cli.positive_int, default=15, help="interleaved timed blocks per model")
    add_device_argument(parser)
    args = parser.parse_args(argv)
    if args.rank > min(args.widths):
        parser.error(f"--rank {args.rank} is above the width {min(args.widths)}: a w x w layer has rank at most w")
    if args.tol is not None:
        try:
            check_tolerance(args.tol)
        except ValueError as error:
            parser.error(f"--tol: {error}")
    device = resolve_device(args.device)
    rows = run(tuple(args.widths), args.rank, args.batch_size, args.iterations, args.repeats, device, args.tol)
    integrator = (f"at fixed rank {args.rank}" if args.tol is None
                  else f"rank-adaptive (ϑ = {args.tol:g}, rank <= {args.rank})")
    print(f"w → w → w → 10, two hidden layers {integrator} (DLRT) vs dense SGD, batch {args.batch_size}, "
          f"{environment(device)}")
    kept = "" if args.tol is None else " (not the output gradients that rank-adaptive DLRT keeps for its S-step)"
    measured_peak = bool(rows and rows[0]["dense"]["cuda_peak"])
    peak = "; CUDA peak of one step beyond what was allocated before it" if measured_peak else ""
    print(f"time: median of {args.repeats} interleaved blocks of {args.iterations} steps, and of the blocks' ratios "
          f"beside their middle half; memory: parameters, gradients, optimizer state and saved activations{kept}{peak}")
    print(f"{'width':>6} {'dense ms':>9} {'DLRT ms':>9} {'time':>7} {'middle half':>12} {'dense MiB':>10} "
          f"{'DLRT MiB':>9} {'memory':>7}")
    for row in rows:
        d, r, time = row["dense"], row["dlrt"], row["time_ratio"]
        memory, target = r["bytes"] / d["bytes"], goal(row, device)
        # a row the goal line judges gets the decimals that tell its ratios from the goal (0.9996 is not 1.00)
        digits = 2 if target is None else decimals((*time, memory), target, 2)
        print(f"{row['width']:>6} {d['seconds'] * 1e3:9.2f} {r['seconds'] * 1e3:9.2f} {time.median:6.{digits}f}x "
              f"{middle_half(time.low, time.high, digits):>12} {d['bytes'] / 2**20:10.2f} {r['bytes'] / 2**20:9.2f} "
              f"{memory:6.{digits}f}x" + (f"  (CUDA peak {r['cuda_peak'] / d['cuda_peak']:.2f}x)"
                                          if d["cuda_peak"] else "")
              + (f"  (ranks {'/'.join(map(str, row['ranks'].values()))} at the end)" if args.tol is not None else ""))
    gpu = f" and batch >= {GPU_BATCH}" if device.type == "cuda" else ""
    held = [row for row in rows if goal(row, device) is not None]
    if not held:
        needs = "a width >= 1024 and a rank <= 64" + (f", and a batch >= {GPU_BATCH} on a GPU" if gpu else "")
        result = f"not measured (it needs {needs})"
    else:
        verdicts = set()
        for row in held:
            time, target = row["time_ratio"], goal(row, device)
            verdicts |= {verdict(time.median, (time.low, time.high), target),
                         verdict(row["dlrt"]["bytes"] / row["dense"]["bytes"], None, target)}
        result = VERDICT_WORDS["no" if "no" in verdicts else "unclear" if "unclear" in verdicts else "yes"]
    print(f"goal: DLRT below dense time and memory from width 1024 at rank <= 64{gpu}: {result}")
