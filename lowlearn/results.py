"""The chapters' headline results, kept per experiment profile so that later chapters can read them.

A chapter calls :func:`record` once it has measured something worth comparing across the
course (a test accuracy at some sparsity, a speed-up, a memory ratio), or
:func:`record_mean` for a number measured over several seeds, and the closing chapter
reads every record back with :func:`load` to put the methods side by side. Each profile
has its own file, ``<directory>/<profile>.json``, so a smoke run never mixes with the
numbers of a cpu or gpu run. The directory is ``$LOWLEARN_RESULTS`` if set, else
``results`` under the current directory (a chapter runs in ``book/``, so its results land
in ``book/results``).

Recording the same ``(chapter, key)`` again replaces that one entry (a chapter that runs
again refreshes its numbers) and keeps every other entry, also when several processes
record at once (they take turns, by a lock on the folder of the file, where the system
has ``flock``: not on Windows). The file is replaced atomically, and a file that cannot
be read is reported, never written over.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime
import json
import math
import numbers
import os
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:                              # Windows: no flock; concurrent records are not locked there
    fcntl = None

import torch
from numpy.typing import ArrayLike

from .atomic import atomic_file
from .checks import as_float, is_real
from .profiles import device_description, get_profile
from .stats import summarize

ENV_VAR = "LOWLEARN_RESULTS"


@dataclasses.dataclass(frozen=True)
class Result:
    """One measured number.

    Attributes:
        value: the number.
        ci: half-width of its 95% interval over seeds or episodes (``None`` for a single run).
        unit: what it counts, such as ``"% accuracy"`` or ``"x dense"``.
        label: one line that says what was measured and in which setting.
        recorded: when it was recorded (ISO 8601, UTC).
        device: the device and torch version that measured it.
    """

    value: float
    ci: float | None = None
    unit: str = ""
    label: str = ""
    recorded: str = ""
    device: str = ""

    def __str__(self) -> str:
        spread = "" if self.ci is None else f" ± {self.ci:.3g}"
        unit = f" {self.unit}" if self.unit else ""
        return f"{self.value:.4g}{spread}{unit}"


def results_path(profile: str | None = None, directory: str | os.PathLike | None = None) -> Path:
    """The file that holds ``profile``'s results (default: the current profile, see :mod:`lowlearn.profiles`)."""
    name = get_profile(profile).name
    folder = Path(directory if directory is not None else os.environ.get(ENV_VAR) or "results")
    return folder / f"{name}.json"


def _read(path: Path) -> tuple[dict, dict[str, dict[str, Result]]]:
    """The stored file, ``{"results": {chapter: {key: entry}}, ...}`` (anything else in it is kept as it is),
    and its entries as checked results, ``{chapter: {key: Result}}``.

    Raises:
        ValueError: the file cannot be read, or holds an entry that is not a result; it is left untouched.
    """
    if not path.exists():
        return {"results": {}}, {}
    try:
        # A repeated key would lose all its entries but the last at the next record.
        stored = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_unique_keys)
        chapters = stored["results"]
        if not all(isinstance(entries, dict) for entries in chapters.values()):
            raise TypeError("every chapter must map to a dictionary of results")
        loaded = {chapter: {key: _entry(chapter, key, entry) for key, entry in entries.items()}
                  for chapter, entries in chapters.items()}
        json.dumps(stored, allow_nan=False)     # as record() writes it back: NaN elsewhere would stop every record
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(
            f"cannot read the results file {path} ({error}); it was left untouched. Move it away "
            f"(or point {ENV_VAR} to another folder) and run the chapters again to record new results"
        ) from error
    return stored, loaded


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    keys = collections.Counter(key for key, _ in pairs)
    if repeated := [key for key, count in keys.items() if count > 1]:
        raise ValueError(f"it holds the keys {repeated} more than once in one object")
    return dict(pairs)


def _entry(chapter: str, key: str, entry: object) -> Result:
    """The stored ``entry`` of ``chapter``'s ``key`` as a checked :class:`Result`, or a ValueError that names it."""
    try:
        _check_name("chapter", chapter)
        _check_name("key", key)
        return _checked(Result(**entry))
    except (TypeError, ValueError) as error:
        raise ValueError(f"it holds an entry that is not a result ({chapter!r}: {key!r}): {error}") from None


def _check_name(kind: str, name: str) -> str:
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"the {kind} of a result must be a non-empty string, got {name!r}")
    if name != name.strip():
        raise ValueError(f"the {kind} of a result must not start or end with spaces (it would be another {kind}), "
                         f"got {name!r}")
    return name


def _check_text(result: Result) -> None:
    """A ValueError unless every field of ``result`` but its numbers is text."""
    fields = ("unit", "label", "recorded", "device")
    not_text = {name: getattr(result, name) for name in fields if not isinstance(getattr(result, name), str)}
    if not_text:
        raise ValueError("a result's " + ", ".join(f"{name} must be text, got {value!r}"
                                                 for name, value in not_text.items()))


def _number_and_interval(value: object, ci: object) -> tuple[float, float | None]:
    """``(value, ci)`` as floats, or a ValueError: a value that is not a finite number, a negative interval."""
    if value is None:
        raise ValueError("a result's value must be a number, got None")
    value, ci = _finite("value", value), _finite("interval", ci)
    if ci is not None and ci < 0:
        raise ValueError(f"a result's interval is a half-width and cannot be negative, got {ci}")
    return value, ci


def _finite(kind: str, number: object) -> float | None:
    """``number`` as a float (a real number, or a one-element tensor or array), or a ValueError; ``None`` passes."""
    if number is None:
        return None
    if hasattr(number, "item") and not isinstance(number, numbers.Real):      # a tensor or a NumPy array
        count = number.numel() if isinstance(number, torch.Tensor) else getattr(number, "size", None)
        if count != 1:
            raise ValueError(f"a result's {kind} must be one number, got a {type(number).__name__} of {count} values")
        number = number.item()
    value = as_float(number)
    if not math.isfinite(value):
        what = "finite number" if is_real(number) else "real number (a float, an int or a tensor)"
        raise ValueError(f"a result's {kind} must be a {what}, got {number!r}")
    return value


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (where the system has ``flock``), so that read-modify-write
    cycles of two processes or threads recording at once do not lose each other's entries."""
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"the results folder {folder} is a file; point {ENV_VAR} (or directory=) to a folder")
    folder.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)                     # closing the descriptor releases the lock


def record(chapter: str, key: str, value: float, *, ci: float | None = None, unit: str = "", label: str = "",
           profile: str | None = None, directory: str | os.PathLike | None = None,
           device: torch.device | str | None = None) -> Result:
    """Store ``value`` as ``chapter``'s result ``key`` in the profile's results file, and return it.

    Args:
        chapter: the chapter's file name without extension, such as ``"pruning"``.
        key: a short stable name for the result, such as ``"snip_error_98"``.
        value: the measured number (a float, or a one-element tensor).
        ci: half-width of its 95% interval, if it has one.
        unit: what the number counts.
        label: one line that says what was measured.
        profile: the profile whose file to write (default: the current one).
        directory: the folder of the results files (default: see the module docstring).
        device: the device that measured the value (default: the machine's default device);
            give it for a measurement made elsewhere, such as a CPU timing on a machine with a GPU.

    Raises:
        ValueError: an empty chapter or key, a value that is not a finite number, an interval that
            is negative or not finite, a unit or label that is not text, or an existing results
            file that cannot be read (it is left as it is).
        NotADirectoryError: the results folder is a file.
    """
    chapter, key = _check_name("chapter", chapter), _check_name("key", key)
    value, ci = _number_and_interval(value, ci)
    result = Result(value=value, ci=ci, unit=unit, label=label,
                    device=f"{device_description(device)}, torch {torch.__version__}",
                    recorded=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    _check_text(result)

    name = get_profile(profile).name
    path = Path(os.path.realpath(results_path(name, directory)))    # through links: lock the folder written to
    with _locked(path.parent):
        stored, _ = _read(path)
        stored["results"].setdefault(chapter, {})[key] = dataclasses.asdict(result)
        text = json.dumps({**stored, "profile": name}, indent=1, sort_keys=True, allow_nan=False)
        with atomic_file(path, overwrite=True, text=True) as handle:
            handle.write(text + "\n")
    return result


def record_mean(chapter: str, key: str, values: ArrayLike | torch.Tensor, *, scale: float = 1.0, unit: str = "",
                label: str = "", profile: str | None = None, directory: str | os.PathLike | None = None,
                device: torch.device | str | None = None) -> Result:
    """:func:`record` the mean of ``scale · values`` (one per seed or run) with its 95% interval, and return it.

    The summary is :func:`lowlearn.stats.summarize`'s: Student's t interval of the mean,
    none for a single value (a profile with one seed). ``scale`` converts units on the
    way, e.g. ``100`` for accuracies recorded in %; the other arguments are :func:`record`'s.

    Raises:
        ValueError: no values, a value that is not finite, or what :func:`record` refuses.
    """
    value, ci = summarize(values, scale)
    return record(chapter, key, value, ci=ci, unit=unit, label=label, profile=profile, directory=directory,
                  device=device)


def load(profile: str | None = None, directory: str | os.PathLike | None = None) -> dict[str, dict[str, Result]]:
    """Every recorded result of ``profile``: ``{chapter: {key: Result}}`` (empty if nothing was recorded).

    Raises:
        ValueError: the results file exists but cannot be read.
    """
    return _read(results_path(profile, directory))[1]


def _checked(result: Result) -> Result:
    """``result`` with its numbers as floats, or a ValueError for a field that :func:`record` would refuse."""
    _check_text(result)
    value, ci = _number_and_interval(result.value, result.ci)
    return dataclasses.replace(result, value=value, ci=ci)
