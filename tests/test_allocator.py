import ctypes
import mmap
from types import SimpleNamespace

import numpy as np
import pytest

from lowlearn import allocator
from lowlearn.allocator import MAX_INT, MAX_MMAP_THRESHOLD, has_glibc, minor_page_faults, retain_freed_memory
from lowlearn.bench.allocator import in_new_process


@pytest.mark.skipif(not has_glibc(), reason="glibc's allocator only")
def test_retained_memory_stops_the_page_faults_of_a_masked_training_step(monkeypatch):
    # The masked LeNet-300-100 of `python -m lowlearn.bench masks`, batch 60, each setting in a fresh process.
    # glibc adapts its thresholds as a program frees memory, and whether its defaults fault varies from run to
    # run; fixed at their initial 128 KiB they always do (a freed 940 KB weight-sized tensor is unmapped).
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", str(128 * 1024))
    sizes = {"batch_size": 60, "iterations": 50, "repeats": 1, "warmup": 100}    # the benchmark's warm-up
    default, retained = (in_new_process("lowlearn masks", retain, threads=1, **sizes)["faults"]
                         for retain in (False, True))
    print(f"minor page faults per step: {default:.1f} with small fixed thresholds, {retained:.1f} retained")
    assert default >= 100, default                 # one 940 KB tensor refaulted is ~230
    assert retained <= 20, (default, retained)


def test_minor_page_faults_count_first_touches():
    if minor_page_faults() is None:
        pytest.skip("getrusage is not available")
    fresh = mmap.mmap(-1, 64 * 2**20)         # anonymous pages from the system, whatever malloc keeps
    start = minor_page_faults()
    for offset in range(0, len(fresh), 4096):
        fresh[offset] = 1
    assert minor_page_faults() - start >= 32  # 16,384 pages of 4 KiB, or 32 of 2 MiB with huge pages
    fresh.close()


@pytest.mark.parametrize("kwargs", [dict(trim_threshold=0), dict(trim_threshold=1.5), dict(mmap_threshold=-1),
                                    dict(mmap_threshold=True), dict(mmap_threshold=MAX_MMAP_THRESHOLD + 1),
                                    dict(trim_threshold=4 * 2**30)])         # would reach glibc truncated to 0
def test_bad_thresholds_are_refused(kwargs):
    with pytest.raises(ValueError, match="threshold"):
        retain_freed_memory(**kwargs)


def install_glibc(monkeypatch, mallopt):
    """Stand in for glibc with ``mallopt(option, value) -> 1 taken, 0 refused``; nothing reaches the real allocator."""
    monkeypatch.setattr(allocator, "has_glibc", lambda: True)
    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda name: SimpleNamespace(mallopt=mallopt))
    monkeypatch.setattr(allocator, "_retained", {})


def test_a_refused_mmap_threshold_changes_nothing(monkeypatch):
    # glibc refuses an mmap threshold above its limit (HEAP_MAX_SIZE / 2: 32 MiB on 64-bit systems, 512 KiB on 32-bit
    # ones; this stand-in's is 16 MiB) but takes any trim threshold: setting the trim threshold first would leave it
    # changed while describe() says "glibc defaults".
    taken = []

    def older_mallopt(option, value):
        if option == allocator._M_MMAP_THRESHOLD and value > 16 * 2**20:
            return 0
        taken.append(option)
        return 1

    install_glibc(monkeypatch, older_mallopt)
    assert retain_freed_memory() is False
    assert taken == [] and allocator.describe() == "glibc defaults"
    assert retain_freed_memory(mmap_threshold=16 * 2**20) is True
    assert sorted(taken) == sorted([allocator._M_MMAP_THRESHOLD, allocator._M_TRIM_THRESHOLD])
    assert allocator.describe().startswith("glibc, freed memory retained")


@pytest.fixture
def recording_glibc(monkeypatch):
    """A glibc whose mallopt records what it is given and takes everything."""
    taken = {}

    def mallopt(option, value):
        taken[option] = value
        return 1

    install_glibc(monkeypatch, mallopt)
    return taken


def test_the_largest_trim_threshold_is_the_largest_c_int(recording_glibc):
    """mallopt takes a C int: 2**31 - 1 at most (ctypes: 2**31 wraps to a negative threshold)."""
    largest = 2 ** (8 * ctypes.sizeof(ctypes.c_int) - 1) - 1
    assert ctypes.c_int(largest).value == largest and ctypes.c_int(largest + 1).value < 0
    assert MAX_INT == largest
    assert retain_freed_memory(trim_threshold=largest) is True
    assert recording_glibc[allocator._M_TRIM_THRESHOLD] == largest
    recording_glibc.clear()
    with pytest.raises(ValueError, match="trim_threshold can be at most"):
        retain_freed_memory(trim_threshold=largest + 1)
    assert recording_glibc == {}


def test_numpy_thresholds_are_numbers_and_reach_glibc_as_python_ints(recording_glibc):
    """A threshold read from an array or a configuration file is a NumPy int; ctypes passes Python ints only."""
    assert retain_freed_memory(trim_threshold=np.int64(2**30), mmap_threshold=np.int32(2**20)) is True
    assert recording_glibc == {allocator._M_TRIM_THRESHOLD: 2**30, allocator._M_MMAP_THRESHOLD: 2**20}
    assert all(type(value) is int for value in recording_glibc.values())
    ctypes.c_int(recording_glibc[allocator._M_TRIM_THRESHOLD])    # what ctypes makes of mallopt's argument


@pytest.mark.skipif(ctypes.sizeof(ctypes.c_long) != 8, reason="glibc's limit on 64-bit systems")
def test_the_largest_mmap_threshold_is_glibcs_32_mib(recording_glibc):
    """glibc's malloc.c: DEFAULT_MMAP_THRESHOLD_MAX = 4 * 1024 * 1024 * sizeof(long), 32 MiB with 8-byte longs."""
    glibc_max = 4 * 1024 * 1024 * ctypes.sizeof(ctypes.c_long)
    assert MAX_MMAP_THRESHOLD == glibc_max
    assert retain_freed_memory(mmap_threshold=glibc_max) is True
    assert recording_glibc[allocator._M_MMAP_THRESHOLD] == glibc_max


def test_describe_names_the_allocator_settings_inherited_from_the_environment(monkeypatch):
    """A process started with glibc's MALLOC_* variables (or another allocator preloaded) does not run glibc's
    defaults: describe(), which every benchmark report prints, names them; without them it says what it said."""
    install_glibc(monkeypatch, lambda option, value: 1)
    for name in list(allocator.environment_settings()):
        monkeypatch.delenv(name)
    assert allocator.describe() == "glibc defaults"
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1073741824")
    monkeypatch.setenv("LD_PRELOAD", "libjemalloc.so.2")
    assert allocator.environment_settings() == {"MALLOC_TRIM_THRESHOLD_": "1073741824",
                                                "LD_PRELOAD": "libjemalloc.so.2"}
    assert allocator.describe() == ("glibc defaults, with LD_PRELOAD=libjemalloc.so.2, "
                                    "MALLOC_TRIM_THRESHOLD_=1073741824 from the environment")
    retain_freed_memory()
    assert allocator.describe().startswith("glibc, freed memory retained (trim threshold 1024 MiB")
    assert allocator.describe().endswith("with LD_PRELOAD=libjemalloc.so.2, MALLOC_TRIM_THRESHOLD_=1073741824 from "
                                         "the environment")
