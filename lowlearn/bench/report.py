"""``python -m lowlearn.bench all --out FOLDER``: every benchmark in one run, one table of ratios.

Runs the benchmarks of :mod:`lowlearn.bench` one after another on one device and
reduces each to rows of the same form: a *case* measured against a *reference*
in the same interleaved rounds, their ratio, and the goal the ratio is held to.
Writes ``benchmarks.json`` (the rows and the environment: device, versions,
threads) and ``benchmarks.md`` (the same as a Markdown table) into the folder,
and prints the table. Existing reports are never replaced: choose a new folder.

``--quick`` runs every benchmark at toy sizes (seconds, for testing the harness;
its ratios mean little, and no goal is judged by them).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from lowlearn.allocator import has_glibc
from lowlearn.atomic import atomic_file

from . import allocator, dst, lowrank, maml, masks, powerprop, sparse
from .timing import (Ratio, add_device_argument, decimals, departures, machine, middle_half, paired_ratio,
                     resolve_device, variants, verdict)

FIELDS = ("benchmark", "case", "reference", "metric", "ratio", "spread", "goal", "met")
"""The keys of every row. ``spread`` is ``[low, high]``, the middle half of the per-round ratios
(:func:`~lowlearn.bench.timing.paired_ratio`) where the benchmark keeps its rounds, else ``None``;
``goal`` is a string such as ``"<= 1.10"`` or ``None``; ``met`` is
:func:`~lowlearn.bench.timing.verdict`'s (``None`` where the sizes are not those the goal is held at, as in
a ``--quick`` report)."""

FULL = {"masks": {}, "dst": {}, "powerprop": {}, "allocator": {}, "lowrank": {}, "maml": {}, "sparse": {}}
QUICK = {
    "masks": {"batch_size": 8, "iterations": 2, "repeats": 1},
    "dst": {"batch_size": 8, "every": 2, "updates": 1, "repeats": 1},
    "powerprop": {"batch_size": 8, "iterations": 2, "repeats": 1},
    "allocator": {"rounds": 1, "batch_size": 8, "iterations": 2, "repeats": 1, "warmup": 1},
    "lowrank": {"widths": (32,), "rank": 4, "batch_size": 8, "iterations": 1, "repeats": 1},
    "maml": {"tasks": 2, "queries": 1, "steps": 1, "iterations": 1, "repeats": 1},
    "sparse": {"features": 64, "batch_size": 4, "densities": (0.5, 0.05), "iterations": 1, "repeats": 1,
               "two_four_large": (128, 64)},
}


def _row(benchmark: str, case: str, reference: str, metric: str, ratio: float | Ratio, goal: float | None = None,
         higher_is_better: bool = False, spread: tuple[float, float] | None = None, held: bool = True) -> dict:
    """One row; a :class:`~lowlearn.bench.timing.Ratio` brings its own spread, a plain number takes ``spread``.
    Not ``held`` at the goal's sizes, the row shows its goal but no verdict."""
    if isinstance(ratio, Ratio):
        ratio, spread = ratio.median, (ratio.low, ratio.high)
    bound = None if goal is None else f"{'>=' if higher_is_better else '<='} {goal:g}"
    return {"benchmark": benchmark, "case": case, "reference": reference, "metric": metric, "ratio": ratio,
            "spread": None if spread is None else list(spread), "goal": bound,
            "met": verdict(ratio, spread, goal, higher_is_better) if held else None}


def _time_rows(benchmark: str, rounds: dict[str, list[float]], references: dict[str, str],
               goals: dict[str, float] | None = None, held: bool = True) -> list[dict]:
    """Rows ``time(case) / time(reference)`` for each ``case: reference``, from the rounds that timed both."""
    goals = goals or {}
    rows = []
    for case, reference in references.items():
        ratio = paired_ratio(rounds, case, reference)
        rows.append(_row(benchmark, case, reference, "time per step", ratio, goals.get(case), held=held))
    return rows


def collect(sizes: dict[str, dict], device: torch.device) -> list[dict]:
    """Run every benchmark with ``sizes[name]`` as keyword arguments; the rows of all of them."""
    rows = []
    # A goal is judged only at the sizes it is held at, as each benchmark's own command does.
    rounds = masks.run(device=device, **sizes["masks"])["rounds"]
    held = not departures(masks.goal_settings(sizes["masks"]))
    for suffix in variants(rounds, "dense"):                                            # the graphs on a GPU
        case, dense, prune = (name + suffix for name in ("lowlearn masks", "dense", "torch.nn.utils.prune"))
        rows += _time_rows("masks", rounds, {"dense (copy)" + suffix: dense, case: dense, prune: dense},
                           {case: masks.GOALS["dense"]}, held)
        rows += _time_rows("masks", rounds, {case: prune}, {case: masks.GOALS["torch.nn.utils.prune"]}, held)
    rounds = dst.run(device=device, **sizes["dst"])
    rows += _time_rows("dst", rounds, {"static": "dense"} | {name: "static" for name in dst.METHODS[2:]},
                       {"RigL": dst.GOAL}, not departures(dst.goal_settings(sizes["dst"])))
    rounds = powerprop.run(device=device, **sizes["powerprop"])["rounds"]
    cases = powerprop.judged_cases(rounds)
    rows += _time_rows("powerprop", rounds, {case: powerprop.baseline(case) for case in cases},
                       dict.fromkeys(cases, powerprop.GOAL), not powerprop.departures_from_the_goal(sizes["powerprop"]))
    if device.type == "cpu" and has_glibc():
        for model, by_setting in allocator.run(**sizes["allocator"]).items():
            default, retained = (by_setting[setting]["seconds"] for setting in allocator.SETTINGS)
            rows.append(_row("allocator", f"{model}, freed memory retained", f"{model}, glibc defaults",
                             "time per step", retained / default))
    rows += _lowrank_rows(sizes["lowrank"], device)
    result = maml.run(device=device, **sizes["maml"])
    peak = result["peak_bytes"]
    held = not departures(maml.goal_settings(sizes["maml"]))
    for name, case in (("lowlearn", "lowlearn MAML"), ("lowlearn batched", "lowlearn MAML, all tasks at once")):
        speedup = paired_ratio(result["rounds"], "higher", name)             # time(higher) / time(lowlearn)
        rows.append(_row("maml", case, "higher", "throughput", speedup, maml.goals(device).get(name),
                         higher_is_better=True, held=held))
        if peak:
            rows.append(_row("maml", case, "higher", "peak memory", peak[name] / max(peak["higher"], 1)))
    large = sizes["sparse"].get("two_four_large", sparse.TWO_FOUR_LARGE)
    for row in sparse.run(device=device, **sizes["sparse"]):
        case = f"{row['format']}, density {row['density']:g}"
        if row["format"].startswith("2:4"):
            case += f", {row['features']} features, batch {row['batch_size']}"
        rows.append(_row("sparse", case, "dense", "speed-up", row["speedup"], sparse.goal(row, device, large),
                         higher_is_better=True, spread=row["spread"]) | {"ideal": row["ideal_speedup"]})
    return rows


def _lowrank_rows(sizes: dict, device: torch.device) -> list[dict]:
    """DLRT against dense, and on a GPU also at :data:`~lowlearn.bench.lowrank.GPU_BATCH`, where the goal is held."""
    runs = [(sizes, "")]
    if device.type == "cuda":
        runs.append((sizes | {"batch_size": lowrank.GPU_BATCH}, f", batch {lowrank.GPU_BATCH}"))
    rows = []
    for run_sizes, suffix in runs:
        for row in lowrank.run(device=device, **run_sizes):
            goal = lowrank.goal(row, device)
            case = f"DLRT, width {row['width']}{suffix}"
            rows.append(_row("lowrank", case, "dense", "time per step", row["time_ratio"], goal))
            rows.append(_row("lowrank", case, "dense", "training memory",
                             row["dlrt"]["bytes"] / row["dense"]["bytes"], goal))
    return rows


def markdown(report: dict) -> str:
    """The report as a Markdown table with the environment above it."""
    env = report["environment"]
    code = f"lowlearn {env['lowlearn']}, " if env.get("lowlearn") else ""        # older reports did not record it
    lines = [f"Benchmarks on {env['device']} ({env['device_name']}), {code}torch {env['torch']}, "
             f"Python {env['python']}, {env['threads']} CPU threads{' (quick sizes)' if report['quick'] else ''}."]
    if env.get("allocator"):
        lines.append(f"Allocator: {env['allocator']}.")
    if report.get("note"):
        lines.append(f"Note: {report['note']}")
    lines += ["", "A ratio of times (a throughput or a speed-up is one too, inverted) is the median of the ratios "
              "measured in each interleaved round; *middle half* is the range of the middle half of those ratios. "
              "A ratio near its goal gets the decimals that tell the two apart.", "",
              "| benchmark | case | against | metric | ratio | middle half | goal | met |",
              "|---|---|---|---|---:|---|---|---|"]
    for row in report["rows"]:
        values = [row["ratio"], *(row["spread"] or ())]
        digits = 2 if row["goal"] is None else decimals(values, float(row["goal"].split()[-1]), 2)
        spread = "" if row["spread"] is None else middle_half(*row["spread"], digits)
        lines.append(f"| {row['benchmark']} | {row['case']} | {row['reference']} | {row['metric']} | "
                     f"{row['ratio']:.{digits}f}x | {spread} | {row['goal'] or ''} | {_met(report, row)} |")
    return "\n".join(lines) + "\n"


def _met(report: dict, row: dict) -> str:
    """The table's "met" cell: the verdict, or why there is none."""
    if row["goal"] and report["quick"]:
        return "not judged (quick sizes)"
    return row["met"] or ""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lowlearn.bench all", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for benchmarks.json and benchmarks.md")
    parser.add_argument("--quick", action="store_true", help="toy sizes, to check the harness")
    add_device_argument(parser)
    parser.add_argument("--note", default="", help="what else to know about the run (e.g. other load on the machine)")
    args = parser.parse_args(argv)
    paths = [args.out / "benchmarks.json", args.out / "benchmarks.md"]
    existing = [str(path) for path in paths if path.exists() or path.is_symlink()]
    if existing:
        sys.exit(f"{', '.join(existing)} exist: choose another --out folder (a report is never overwritten)")
    try:                                               # before the benchmarks run, not after
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        sys.exit(f"cannot use {args.out} as the report folder: {error}")
    maml.import_higher()                               # the peer of a late benchmark: missing, it would end the run
    device = resolve_device(args.device)
    rows = collect(QUICK if args.quick else FULL, device)
    if args.quick:                                     # toy sizes say nothing about the goals
        rows = [row | {"met": None} for row in rows]
    report = {"environment": machine(device), "quick": args.quick, "note": args.note, "rows": rows}
    print(markdown(report))
    try:
        for path, text in ((paths[0], json.dumps(report, indent=1) + "\n"), (paths[1], markdown(report))):
            with atomic_file(path, overwrite=False, text=True) as handle:     # a file that appeared meanwhile stays
                handle.write(text)
    except FileExistsError as error:
        sys.exit(f"{error}; the report is printed above")
    print(f"written: {paths[0]} and {paths[1]}")
