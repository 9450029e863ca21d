import mmap
import platform
import subprocess
import sys

import pytest

from lowlearn.allocator import MAX_MMAP_THRESHOLD, minor_page_faults, retain_freed_memory

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# A masked LeNet-300-100 training step (SGD with momentum, batch 60), the workload of
# `python -m lowlearn.bench masks`; prints the minor page faults per step.
STEPS = """
import sys
import torch
import torch.nn.functional as F
from lowlearn.allocator import minor_page_faults, retain_freed_memory
from lowlearn.models import MLP
from lowlearn.sparse.mask import attach_masks

torch.set_num_threads(1)
if sys.argv[1] == "retain":
    assert retain_freed_memory()
torch.manual_seed(0)
model = MLP()
attach_masks(model)
optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
x, y = torch.randn(60, 784), torch.randint(0, 10, (60,))


def step():
    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    optimizer.step()


for _ in range(20):
    step()
start = minor_page_faults()
for _ in range(50):
    step()
print((minor_page_faults() - start) / 50)
"""


def _faults_per_step(mode: str) -> float:
    done = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return float(done.stdout)


@pytest.mark.skipif(not GLIBC, reason="glibc's allocator only")
def test_retained_memory_stops_the_page_faults_of_a_masked_training_step():
    default, retained = _faults_per_step("default"), _faults_per_step("retain")
    print(f"minor page faults per step: {default:.1f} with glibc's defaults, {retained:.1f} retained")
    assert retained <= 20, (default, retained)     # one 940 KB weight-sized tensor refaulted would be ~230


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
                                    dict(mmap_threshold=True), dict(mmap_threshold=MAX_MMAP_THRESHOLD + 1)])
def test_bad_thresholds_are_refused(kwargs):
    with pytest.raises(ValueError, match="threshold"):
        retain_freed_memory(**kwargs)
