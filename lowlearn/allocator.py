"""Keep freed CPU memory for the next training step instead of handing it back to the system.

On Linux, PyTorch's CPU tensors come from the C library's ``malloc`` (glibc's). When
a large block is freed, glibc may give its pages back to the operating system:
blocks above the *mmap threshold* are unmapped, and free space above the *trim
threshold* at the top of the heap is released. The next tensor of that size then
pays a page fault for every 4 KiB page it touches. glibc adapts both thresholds to
the program: after freeing a mapped block of ``S`` bytes, it maps only larger blocks
and trims only beyond ``2S`` of free space.

A dense training step frees and reallocates about one gradient per layer, and these
thresholds usually keep it fault-free. A layer with a parametrization allocates more
per step: a masked layer (:mod:`lowlearn.sparse.mask`) its masked weight in the
forward pass and a second gradient in the backward pass, a Powerpropagation layer
(:mod:`lowlearn.powerprop`) its effective weight and the gradient of ``φ``. That can be
more free space at once than the adapted threshold allows, so that it is trimmed after
a step and faulted back in during the next: ``python -m lowlearn.bench allocator``
counted about 100 faults per step for a masked and for a Powerprop LeNet-300-100
(batch 60, one model per process), and none for the dense one.

:func:`retain_freed_memory` fixes both thresholds for the process (glibc's
``mallopt``), so freed blocks stay in the heap and are reused, and the faults stop.
Whether that makes training faster depends on the machine and the model, and the
same benchmark times each model under both settings (the course's CPU report,
``reports/cpu``, has its rows). On one thread of one quiet machine it changes from run
to run: eight runs of it had the masked step 0.77× to 1.02× as long with freed memory
retained, the Powerprop step 0.53× to 1.02×, and the dense step, which has no faults to
save, 0.95× to 1.04×. Measure before adopting it. Larger activations gain more
clearly, and the two Omniglot chapters call it. There, in two runs of each setting, a
ProtoNet meta-training step (a Conv4 with 64 channels on a 20-way episode of 120
images, two threads) faulted in 13,000 to 15,000 pages with glibc's defaults and about
800 with freed memory retained, and ran 1.24 to 1.32 times as fast with them retained;
a matching network's step faulted in 13,000 or 360 pages with the defaults (glibc's
adapted thresholds differ from run to run) and at most 60 retained, and ran 1.27 and
1.01 times as fast. The results do not change: only where the memory comes from
does. The price is that the process keeps up to ``trim_threshold`` bytes of freed
memory instead of returning it. PyTorch's performance tuning guide recommends another
allocator (jemalloc or tcmalloc, through ``LD_PRELOAD``) for the same reason; glibc's
environment variables ``MALLOC_TRIM_THRESHOLD_`` and ``MALLOC_MMAP_THRESHOLD_`` are a
third way.
GPU memory is unaffected: PyTorch's CUDA allocator caches its blocks itself.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

from .checks import check_count

_M_TRIM_THRESHOLD = -1   # glibc's malloc.h
_M_MMAP_THRESHOLD = -3
MAX_MMAP_THRESHOLD = 32 * 1024 * 1024
"""glibc's largest mmap threshold on 64-bit systems (``HEAP_MAX_SIZE / 2``): older versions refuse a larger one
(and on 32-bit systems one above 512 KiB); 2.36 took any."""
MAX_INT = 2**31 - 1
"""The largest value ``mallopt`` takes (a C ``int``): ctypes would pass a larger one truncated."""

_retained: dict[str, int] = {}   # the thresholds set by retain_freed_memory (glibc cannot be asked for them)


def has_glibc() -> bool:
    """Whether this process allocates with glibc (Linux, not musl), whose thresholds this module sets."""
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def retain_freed_memory(trim_threshold: int = 1 << 30, mmap_threshold: int = MAX_MMAP_THRESHOLD) -> bool:
    """Make glibc keep freed memory for reuse, and return whether it did.

    Blocks smaller than ``mmap_threshold`` then come from the heap, which is trimmed
    only beyond ``trim_threshold`` bytes of free space at its top. This affects the
    whole process from the call on, and cannot be undone (glibc stops
    adapting its thresholds once they are set). Call it once, before training.

    Args:
        trim_threshold: bytes of free memory at the top of the heap kept before any is returned
            to the system (default 1 GiB).
        mmap_threshold: blocks at least this large get their own mapping, returned to the system
            when freed (default and largest: 32 MiB).

    Returns:
        ``True`` if glibc took both settings; ``False`` where there is no glibc (macOS,
        Windows, musl) or glibc refused ``mmap_threshold``, in which case nothing changed.

    Raises:
        ValueError: a threshold that is not a positive integer (a Python or NumPy int), ``trim_threshold`` above
            2 GiB − 1 (a C ``int``), or ``mmap_threshold`` above 32 MiB.
    """
    trim_threshold = check_count("trim_threshold", trim_threshold, 1)     # a Python int, which ctypes can pass
    mmap_threshold = check_count("mmap_threshold", mmap_threshold, 1)
    if trim_threshold > MAX_INT:
        raise ValueError(f"trim_threshold can be at most {MAX_INT} bytes (2 GiB − 1: glibc's mallopt takes a C int), "
                         f"got {trim_threshold}")
    if mmap_threshold > MAX_MMAP_THRESHOLD:
        raise ValueError(f"mmap_threshold can be at most {MAX_MMAP_THRESHOLD} bytes (32 MiB, glibc's limit), "
                         f"got {mmap_threshold}")
    if not has_glibc():
        return False
    mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    # The mmap threshold first: glibc may refuse it (it always takes a trim threshold), and then nothing is set.
    if not (mallopt(_M_MMAP_THRESHOLD, mmap_threshold) and mallopt(_M_TRIM_THRESHOLD, trim_threshold)):
        return False
    _retained.update(trim=trim_threshold, mmap=mmap_threshold)
    return True


def environment_settings() -> dict[str, str]:
    """Allocator settings this process took from its environment: glibc's ``MALLOC_*`` variables,
    ``GLIBC_TUNABLES``, and ``LD_PRELOAD`` (which may load another allocator, e.g. jemalloc).

    Processes started from this one inherit them.
    """
    return {name: value for name, value in os.environ.items()
            if name.startswith("MALLOC_") or name in ("GLIBC_TUNABLES", "LD_PRELOAD")}


def describe() -> str:
    """The allocator's settings in words, as benchmark reports print them.

    ``"glibc defaults"``, ``"glibc, freed memory retained (...)"`` or ``"not glibc"``;
    settings from the environment (:func:`environment_settings`) are named after it
    (glibc's defaults are then not what runs).
    """
    if not has_glibc():
        words = "not glibc"
    elif not _retained:
        words = "glibc defaults"
    else:
        words = (f"glibc, freed memory retained (trim threshold {_retained['trim'] / 2**20:g} MiB, "
                 f"mmap threshold {_retained['mmap'] / 2**20:g} MiB)")
    if settings := environment_settings():
        words += ", with " + ", ".join(f"{name}={value}" for name, value in sorted(settings.items()))
        words += " from the environment"
    return words


def minor_page_faults() -> int | None:
    """Minor page faults of this process so far (``getrusage``), or ``None`` where it is not available (Windows).

    Take the difference around the code to measure.
    """
    try:
        import resource
    except ImportError:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
