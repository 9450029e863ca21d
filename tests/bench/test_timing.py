import mmap

import pytest

from lowlearn import allocator
from lowlearn.bench import timing


def test_faults_per_call_counts_the_pages_a_step_maps_afresh():
    if allocator.minor_page_faults() is None:
        pytest.skip("getrusage is not available")

    def touch_fresh_pages():
        fresh = mmap.mmap(-1, 64 * 2**20)           # anonymous pages from the system, whatever malloc keeps
        for offset in range(0, len(fresh), 4096):
            fresh[offset] = 1
        fresh.close()

    faults = timing.faults_per_call({"nothing": lambda: None, "64 MiB": touch_fresh_pages}, calls=2)
    assert faults["nothing"] < 1 and faults["64 MiB"] >= 32    # 16,384 pages of 4 KiB, or 32 of 2 MiB
