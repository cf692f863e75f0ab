"""The allocator setting of decomp's processes (decomp.allocator)."""

import platform
import subprocess
import sys

import pytest

from decomp.allocator import reuse_freed_memory

FAULTS = """
import resource, sys, torch
from decomp.allocator import reuse_freed_memory
applied = reuse_freed_memory() if sys.argv[1] == "reuse" else None
torch.ones(1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
# 64 MiB tensors (above glibc's default mmap threshold, 32 MiB at most), three held at once and
# freed together: the freed top of the heap is kept for the next three, not trimmed
for _ in range(7):
    x = [torch.ones(16 << 20) for _ in range(3)]
    del x
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, check=True)
    applied, faults = out.stdout.split()
    return applied, int(faults)


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_freed_tensors_are_reused_without_page_faults():
    # each fresh 64 MiB mapping faults in its 16384 pages; reused heap memory faults once
    applied, reused = _faults("reuse")
    _, system = _faults("system")
    assert applied == "True"
    assert system > 21 * 16384 * 0.9
    assert reused < system / 3, (reused, system)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_a_threshold_must_be_a_positive_number_of_bytes(bad):
    with pytest.raises(ValueError, match="threshold"):
        reuse_freed_memory(bad)
