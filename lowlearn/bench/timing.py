"""Timing helpers shared by the benchmarks."""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import torch

import lowlearn
from lowlearn import allocator, cli
from lowlearn.checks import check_count
from lowlearn.train import default_device


def _sync(device: torch.device) -> None:
    """Wait for the device's queued work, so that a clock read after it measures the work, not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def interleaved_rounds(
    steps: Mapping[str, Callable[[], None]],
    *,
    device: torch.device,
    iterations: int,
    repeats: int,
    warmup: int,
    seed: int = 0,
) -> dict[str, list[float]]:
    """Seconds per call of each step function in each of ``repeats`` interleaved rounds, in shuffled order.

    Each round times ``iterations`` calls of every function, so slow drifts of the
    machine (clock, other load) hit all of them alike. The order within a round is
    drawn anew every round (from ``seed``, so a run can be repeated): a fixed order
    favours some places in it, through what ran just before (the caches, the
    allocator's free lists): timing a network against a copy of itself on a 2-core
    CPU, a fixed order put the copy 4-9% behind in three runs of three. Many short
    rounds mix better than a few long ones. What noise is left shows in the
    ``dense (copy)`` row of ``masks`` and in the spread of :func:`paired_ratio`. The
    device is synchronised before and after each timed block, never inside it.
    Python's garbage collector stays on (``timeit`` turns it off): the collections a
    step's objects cause are part of its cost in training too.

    Returns:
        ``{name: [seconds per call in round 1, round 2, ...]}``.

    Raises:
        ValueError: ``iterations`` or ``repeats`` below 1, or ``warmup`` below 0.
    """
    check_count("iterations", iterations, 1)
    check_count("repeats", repeats, 1)
    check_count("warmup", warmup, 0)
    for step in steps.values():
        for _ in range(warmup):
            step()
    order = list(steps)
    shuffle = random.Random(seed).shuffle
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        shuffle(order)
        for name in order:
            step = steps[name]
            _sync(device)
            start = time.perf_counter()
            for _ in range(iterations):
                step()
            _sync(device)
            samples[name].append((time.perf_counter() - start) / iterations)
    return samples


def interleaved_medians(steps: Mapping[str, Callable[[], None]], **options) -> dict[str, float]:
    """Median seconds per call of each step function over the rounds of :func:`interleaved_rounds` (same options)."""
    return medians(interleaved_rounds(steps, **options))


def medians(rounds: Mapping[str, list[float]]) -> dict[str, float]:
    """The median of each function's seconds per call over the rounds."""
    return {name: statistics.median(values) for name, values in rounds.items()}


def middle_half(low: float, high: float, digits: int = 2) -> str:
    """``"low-high"``, the middle half of a ratio's values over the rounds, as the tables print it."""
    return f"{low:.{digits}f}-{high:.{digits}f}"


class Ratio(NamedTuple):
    """A time ratio: the median and the quartiles of its values over the rounds."""

    median: float
    low: float
    high: float

    def shown(self, digits: int = 3) -> str:
        """``"median (middle half low-high)"`` with ``digits`` decimals, as the goal lines print it."""
        return f"{self.median:.{digits}f} (middle half {middle_half(self.low, self.high, digits)})"

    def __str__(self) -> str:
        return self.shown()


def decimals(values: Iterable[float], goal: float, fewest: int) -> int:
    """The fewest decimals, from ``fewest`` up to 6, that print no value but ``goal`` itself as the goal.

    At three decimals 0.9996 prints as 1.000, beside a goal of >= 1 that it misses;
    at four it prints as 0.9996.
    """
    values, digits = list(values), fewest
    while digits < 6 and any(value != goal and round(value, digits) == goal for value in values):
        digits += 1
    return digits


def verdict(ratio: float, spread: tuple[float, float] | None, goal: float | None,
            higher_is_better: bool = False) -> str | None:
    """Whether ``ratio`` meets ``goal``: ``"yes"``, ``"no"``, ``"unclear"``, or ``None`` without a goal.

    With a ``spread`` (the middle half of the per-round ratios, :func:`paired_ratio`)
    the whole middle half must meet the goal for a "yes", or miss it for a "no"; a
    goal inside it is neither clearly met nor clearly missed.
    """
    if goal is None:
        return None
    meets = [value >= goal if higher_is_better else value <= goal for value in (spread or (ratio,))]
    return "yes" if all(meets) else "no" if not any(meets) else "unclear"


VERDICT_WORDS = {"yes": "met", "no": "not met", "unclear": "unclear (the goal lies within the middle half)"}
"""How the benchmarks' goal lines print a :func:`verdict`."""


def judged(ratio: Ratio, goal: float, higher_is_better: bool = False, not_held: Sequence[str] = ()) -> str:
    """``ratio`` with its middle half and its :func:`verdict` against ``goal``, as a goal line prints them.

    The numbers get as many decimals as it takes to tell them from the goal
    (:func:`decimals`). ``not_held`` are the settings of this run that differ from
    those the goal is held at (:func:`departures`): with any, the ratio is printed
    with them instead of a verdict, since another workload says nothing about the goal.
    """
    if not_held:
        return f"{ratio}, not judged (this run: {', '.join(not_held)})"
    shown = ratio.shown(decimals(ratio, goal, 3))
    return f"{shown}, {VERDICT_WORDS[verdict(ratio.median, (ratio.low, ratio.high), goal, higher_is_better)]}"


def departures(settings: Mapping[str, tuple[float, float]]) -> list[str]:
    """``"name = value"`` for each setting of ``{name: (this run's value, the goal's)}`` where the two differ."""
    return [f"{name} = {this:g}" for name, (this, held) in settings.items() if this != held]


def held_at(settings: Mapping[str, tuple[float, float]]) -> str:
    """``"name = value, ..."``: the settings a goal is held at, from the same mapping as :func:`departures`."""
    return ", ".join(f"{name} = {held:g}" for name, (_, held) in settings.items())


def paired_ratio(rounds: Mapping[str, list[float]], case: str, reference: str) -> Ratio:
    """``time(case) / time(reference)`` in each round of :func:`interleaved_rounds`: its median and quartiles.

    The two were timed in the same round, moments apart, so a slow phase of the
    machine slows both and cancels from their ratio. The quartiles (the middle half
    of the rounds' ratios) show how far one round's ratio wanders: a goal within
    them is neither clearly met nor clearly missed.
    """
    if len(rounds[case]) != len(rounds[reference]):
        raise ValueError(f"{case!r} has {len(rounds[case])} rounds and {reference!r} {len(rounds[reference])}: a ratio "
                         "pairs the rounds of one run of interleaved_rounds")
    ratios = [c / r for c, r in zip(rounds[case], rounds[reference])]
    if len(ratios) == 1:
        return Ratio(ratios[0], ratios[0], ratios[0])
    low, median, high = statistics.quantiles(ratios, n=4, method="inclusive")
    return Ratio(median, low, high)


def faults_per_call(steps: Mapping[str, Callable[[], None]], calls: int) -> dict[str, float | None]:
    """Minor page faults per call of each step function (``None`` where the system does not count them).

    A fault is the first touch of a page the process got from the system: memory
    that the allocator had returned and must map again (see :mod:`lowlearn.allocator`).
    """
    faults = {}
    for name, step in steps.items():
        start = allocator.minor_page_faults()
        for _ in range(calls):
            step()
        end = allocator.minor_page_faults()
        faults[name] = None if start is None else (end - start) / calls
    return faults


GRAPH = ", CUDA graph"
"""The suffix of a case whose step is captured in a CUDA graph and replayed (:func:`cuda_graphed`)."""


def cuda_graphed(make_step: Callable[[], Callable[[], None]], device: torch.device,
                 warmup: int = 3) -> Callable[[], None]:
    """The step that ``make_step()`` builds, captured in a CUDA graph: the returned function replays its kernels.

    A small network's training step on a GPU is mostly the host launching kernels one
    by one (for LeNet-300-100 on an H100, 1.3 ms a step against 0.13 ms of work on the
    GPU: ``reports/cuda/masks.txt``), so eager timings compare Python overheads. A replay launches the whole
    step at once, which measures the work on the GPU: what a launch-bound model costs
    when run the fast way (``torch.cuda.graphs``, or ``torch.compile(mode="reduce-overhead")``).

    The step must keep its tensors where they are between calls (an optimizer that steps
    on the GPU, such as Adam with ``capturable=True``); its lazily made state is made in
    the ``warmup`` calls before the capture. The model is built, warmed up and captured
    on one side stream: a tensor kept from one step to the next with its autograd graph
    (``torch.nn.utils.prune``'s ``weight``, computed when the pruning is applied) would
    otherwise tie the captured backward pass to the stream it was made on. The returned
    function holds the step, and through it the model, optimizer and batch whose memory
    the graph reads and writes.

    Raises:
        ValueError: ``device`` is not a CUDA device.
    """
    if device.type != "cuda":
        raise ValueError(f"CUDA graphs need a CUDA device, got {device}")
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        step = make_step()
        for _ in range(warmup):
            step()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            step()
    torch.cuda.current_stream(device).wait_stream(stream)
    return _Replay(graph, step)


def variants(rounds: Mapping[str, list[float]], name: str) -> list[str]:
    """The suffixes (``""``, :data:`GRAPH`) with which ``name`` was timed: its eager step and, on a GPU, its graph."""
    return [suffix for suffix in ("", GRAPH) if name + suffix in rounds]


class _Replay:
    """A captured step's replay (:func:`cuda_graphed`); it keeps the step alive, and with it the graph's tensors."""

    def __init__(self, graph: torch.cuda.CUDAGraph, step: Callable[[], None]):
        self.graph, self.step = graph, step

    def __call__(self) -> None:
        self.graph.replay()


def timed_steps(steps: Mapping[str, Callable[[], None]], *, device: torch.device, iterations: int, repeats: int,
                warmup: int) -> dict[str, dict]:
    """Time the step functions (:func:`interleaved_rounds`), then count their page faults over one more block.

    Returns:
        A dict with ``"rounds"``: ``{name: seconds per call in each round}``; ``"seconds"``:
        ``{name: their median}``; ``"faults"``: ``{name: page faults per call}``, None where
        the system does not count them (:func:`faults_per_call`).
    """
    rounds = interleaved_rounds(steps, device=device, iterations=iterations, repeats=repeats, warmup=warmup)
    return {"rounds": rounds, "seconds": medians(rounds), "faults": faults_per_call(steps, iterations)}


def print_steps(timed: Mapping[str, dict], reference: Callable[[str], str], name_header: str,
                ratio_header: str) -> None:
    """Print :func:`timed_steps`' result: a row a step function with its ms per call, ratio and page faults.

    ``reference(name)`` is the function each one's ratio (:func:`paired_ratio`) is taken
    against; a function against itself shows 1.
    """
    rounds, faults = timed["rounds"], timed["faults"]
    width = max(len(name_header), *map(len, rounds))
    print(f"{name_header:<{width}} {'ms/step':>9} {ratio_header:>12} {'middle half':>13} {'page faults/step':>17}")
    for name, seconds in timed["seconds"].items():
        ratio = paired_ratio(rounds, name, reference(name))
        fault = "n/a" if faults[name] is None else f"{faults[name]:.1f}"
        print(f"{name:<{width}} {seconds * 1e3:9.3f} {ratio.median:11.3f}x "
              f"{middle_half(ratio.low, ratio.high, 3):>13} {fault:>17}")


def cuda_peak_bytes(step: Callable[[], None], device: torch.device) -> int | None:
    """Bytes one call of ``step`` allocates at its peak beyond what was allocated before it (CUDA), else ``None``.

    Call it once the step's lazily created state (an optimizer's moments) exists: after
    timing it, or after one call of its own.
    """
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    step()
    _sync(device)
    return torch.cuda.max_memory_allocated(device) - base


def fixed_batch(batch_size: int, features: int, device: torch.device, classes: int = 10,
                seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """A reproducible random classification batch ``(x, y)`` on ``device``: timing does not depend on the data."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, features, generator=generator, device="cpu")
    y = torch.randint(0, classes, (batch_size,), generator=generator, device="cpu")
    return x.to(device), y.to(device)


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    """The ``--device`` option of every benchmark but ``allocator``, which measures glibc's allocator on the CPU."""
    parser.add_argument("--device", type=cli.device, default=None, help="default: cuda if available, else cpu")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device``, or :func:`lowlearn.train.default_device` when it is ``None``."""
    return torch.device(device) if device else default_device()


def machine(device: str | torch.device | None) -> dict:
    """What the timings depend on: device (and its name), the code (lowlearn's version and commit), torch and
    Python versions, CPU threads, allocator."""
    device = resolve_device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return {"device": str(device), "device_name": name, "lowlearn": _code_version(), "torch": torch.__version__,
            "python": platform.python_version(), "threads": torch.get_num_threads(), "allocator": allocator.describe()}


def _cpu_name() -> str:
    """The CPU's model name from Linux's ``/proc/cpuinfo``, else what :mod:`platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _code_version() -> str:
    """lowlearn's version, and the commit of the source checkout it runs from (``git describe --dirty``), if any.

    Only a checkout counts (the folder above the package holds lowlearn's
    ``pyproject.toml``), not a git repository that an installed copy happens to sit in.
    """
    version = lowlearn.__version__
    root = Path(lowlearn.__file__).resolve().parent.parent
    if not (root / "pyproject.toml").is_file():
        return version
    try:
        done = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty"], capture_output=True,
                              text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):                 # no git, or it hung
        return version
    commit = done.stdout.strip()
    return f"{version} ({commit})" if done.returncode == 0 and commit else version


def environment(device: str | torch.device | None) -> str:
    """:func:`machine` in one line: ``"device D (its name), lowlearn ..., torch ..., N CPU threads, allocator ..."``."""
    env = machine(device)
    return (f"device {env['device']} ({env['device_name']}), lowlearn {env['lowlearn']}, torch {env['torch']}, "
            f"{env['threads']} CPU threads, allocator {env['allocator']}")
