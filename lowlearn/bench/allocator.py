"""Training-step time with glibc's default allocator settings and with freed memory retained.

A training process trains one model, and how often its steps page-fault depends on
what that process allocated before (see :mod:`lowlearn.allocator`), so every
measurement here runs in a process of its own: it calls
:func:`lowlearn.allocator.retain_freed_memory` or not, builds the models of ``masks``
(density 0.1) or of ``powerprop``, trains one of them (dense, masked, or Powerprop
with SGD), warms up, and times blocks of its training steps. The rounds alternate
the two settings and the models, so that slow drifts of the machine hit them alike.
Printed per model: the median time per step under each setting, their ratio, and the
page faults per step. CPU only (the CUDA allocator caches its memory itself), Linux
with glibc only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

from lowlearn import allocator, cli

from . import masks, powerprop
from .timing import fixed_batch

MODELS = ("dense", "lowlearn masks", "Powerprop, SGD")
SETTINGS = ("glibc defaults", "freed memory retained")


def _step(model: str, batch_size: int):
    x, y = fixed_batch(batch_size, 784, torch.device("cpu"))
    if model == "Powerprop, SGD":
        return powerprop.build_case(model, 3.0, x, y)[0]
    return masks.train_step(masks.build_model(model, 0.1, x.device), x, y)


def worker(model: str, retain: bool, batch_size: int, iterations: int, repeats: int, warmup: int) -> dict:
    """In this process: median seconds per training step of ``model`` and its page faults per step."""
    if retain and not allocator.retain_freed_memory():
        raise RuntimeError("glibc refused the allocator settings")
    step = _step(model, batch_size)
    for _ in range(warmup):
        step()
    start_faults, times = allocator.minor_page_faults(), []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iterations):
            step()
        times.append((time.perf_counter() - start) / iterations)
    return {"seconds": statistics.median(times),
            "faults": (allocator.minor_page_faults() - start_faults) / (repeats * iterations)}


def in_new_process(model: str, retain: bool, threads: int, **sizes) -> dict:
    """:func:`worker` run in a fresh Python process with ``threads`` CPU threads; its result.

    Raises:
        RuntimeError: the process failed (its error output is in the message).
    """
    code = ("import json, torch; from lowlearn.bench.allocator import worker; "
            f"torch.set_num_threads({threads}); "
            f"print(json.dumps(worker({model!r}, {retain}, **{sizes!r})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"the worker for {model!r} failed:\n{done.stderr}")
    return json.loads(done.stdout.splitlines()[-1])


def run(rounds: int = 3, batch_size: int = 60, iterations: int = 200, repeats: int = 5, warmup: int = 100,
        threads: int | None = None) -> dict[str, dict[str, dict[str, float]]]:
    """``{model: {setting: {"seconds": median over rounds, "faults": per step}}}``, one process per measurement.

    Raises:
        RuntimeError: not Linux with glibc, or a worker process failed.
    """
    if not allocator.has_glibc():
        raise RuntimeError("this benchmark compares glibc's allocator settings: it needs Linux with glibc")
    threads = threads or torch.get_num_threads()
    sizes = {"batch_size": batch_size, "iterations": iterations, "repeats": repeats, "warmup": warmup}
    samples = {model: {setting: [] for setting in SETTINGS} for model in MODELS}
    for round_ in range(rounds):
        forward = round_ % 2 == 0                      # every other round runs the settings and the models backwards
        for setting in SETTINGS if forward else SETTINGS[::-1]:
            for model in MODELS if forward else MODELS[::-1]:
                samples[model][setting].append(in_new_process(model, setting != SETTINGS[0], threads, **sizes))
    return {model: {setting: {"seconds": statistics.median(r["seconds"] for r in runs),
                              "faults": statistics.median(r["faults"] for r in runs)}
                    for setting, runs in by_setting.items()}
            for model, by_setting in samples.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lowlearn.bench allocator", description=__doc__)
    parser.add_argument("--rounds", type=cli.positive_int, default=3, help="processes per model and setting")
    parser.add_argument("--batch-size", type=cli.positive_int, default=60)
    parser.add_argument("--iterations", type=cli.positive_int, default=200, help="training steps per timed block")
    parser.add_argument("--repeats", type=cli.positive_int, default=5, help="timed blocks per process")
    parser.add_argument("--warmup", type=cli.natural_int, default=100, help="untimed steps per process")
    args = parser.parse_args(argv)
    if not allocator.has_glibc():
        parser.error("this benchmark compares glibc's allocator settings: it needs Linux with glibc")
    threads = torch.get_num_threads()
    results = run(args.rounds, args.batch_size, args.iterations, args.repeats, args.warmup, threads)
    print(f"LeNet-300-100 training step, batch {args.batch_size}, one model per process, cpu, torch "
          f"{torch.__version__}, {threads} CPU threads")
    print(f"median over {args.rounds} processes per model and setting, each the median of {args.repeats} blocks "
          f"of {args.iterations} steps")
    if allocator.environment_settings():
        print(f"every process inherits this one's environment ({allocator.describe()}): 'defaults' are glibc's "
              "defaults as these variables change them; unset them to compare with glibc's own")
    print(f"{'model':<16} {'defaults ms':>12} {'faults':>7} {'retained ms':>12} {'faults':>7} "
          f"{'retained/defaults':>18}")
    for model, by_setting in results.items():
        default, retained = (by_setting[setting] for setting in SETTINGS)
        print(f"{model:<16} {default['seconds'] * 1e3:12.3f} {default['faults']:7.1f} "
              f"{retained['seconds'] * 1e3:12.3f} {retained['faults']:7.1f} "
              f"{retained['seconds'] / default['seconds']:17.3f}x")
    for setting in SETTINGS:
        dense = results["dense"][setting]["seconds"]
        print(f"{setting}: masks / dense {results['lowlearn masks'][setting]['seconds'] / dense:.3f}")
