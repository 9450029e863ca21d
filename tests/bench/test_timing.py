import torch

from lowlearn import allocator
from lowlearn.bench import timing


def test_faults_per_call_counts_the_pages_a_step_maps_afresh():
    if allocator.minor_page_faults() is None:
        return
    faults = timing.faults_per_call({"nothing": lambda: None,
                                     "64 MiB": lambda: torch.ones(64 * 2**20, dtype=torch.uint8)}, calls=2)
    assert faults["nothing"] < 1 <= 16 <= faults["64 MiB"]      # above glibc's largest mmap threshold
