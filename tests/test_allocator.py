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


def resident_kib():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS:"))


base = resident_kib()
x = [torch.ones(16 << 20) for _ in range(3)]  # 3 × 64 MiB, above glibc's default mmap threshold (32 MiB at most)
del x
kept = resident_kib() - base  # what the process kept of the 192 MiB it freed
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):  # the next tensors of that size
    y = torch.ones(16 << 20)
    del y
print(applied, kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> tuple[str, int, int]:
    out = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, check=True)
    applied, kept, faults = out.stdout.split()
    return applied, int(kept), int(faults)


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_freed_tensors_are_kept_and_reused_without_page_faults():
    # each fresh 64 MiB mapping faults in its 16384 pages and is unmapped when freed; with the
    # setting, freed memory stays in the heap (never trimmed) and the next tensors reuse it
    applied, kept, reused = _faults("reuse")
    _, kept_system, system = _faults("system")
    assert applied == "True"
    assert kept > 0.9 * 3 * 65536 and kept_system < 32768, (kept, kept_system)
    assert system > 10 * 16384 * 0.9
    assert reused < system / 3, (reused, system)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_a_threshold_must_be_a_positive_number_of_bytes(bad):
    with pytest.raises(ValueError, match="threshold"):
        reuse_freed_memory(bad)
