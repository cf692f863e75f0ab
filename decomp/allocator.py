"""Keep freed CPU memory for the next tensor: the allocator setting an instrumented run needs.

With glibc (Linux), every allocation above malloc's mmap threshold (at most 32 MiB by default)
is mapped fresh from the kernel and unmapped when freed, so each large tensor pays one page
fault per 4 KiB page the first time it is written. An exact decomposition of a real LM allocates
many of them — parameter-sized vectors, vocabulary-sized activations, the double backward's
buffers — and on a real LM on CPU those faults are a large part of its time
(``benchmarks/results.md``). Raising the mmap threshold and turning trimming off keeps freed
blocks in malloc's heap for the next tensor of that size, as PyTorch's caching allocator does on a GPU. The cost is
that memory freed by the process is not returned to the system until it exits: the process keeps
its peak. That is deliberate: with any finite trim threshold, every decomposition after the
first refaults the part of its peak above that threshold; with trimming off, the second and
later ones fault nothing (docs/engineering.md §7).

The setting belongs to the process, not to a measurement: decomp's command line applies it at
start (``decomp run``, ``decomp compare``, the benchmarks); a program that uses decomp as a
library can call :func:`reuse_freed_memory` once at start, or set the environment variables
``MALLOC_MMAP_THRESHOLD_=1073741824`` and ``MALLOC_TRIM_THRESHOLD_`` (above the process's peak,
in bytes) before Python starts.
"""

from __future__ import annotations

import ctypes
import platform

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
NEVER_TRIM = -1  # mallopt(3): "Setting M_TRIM_THRESHOLD to -1 disables trimming completely"
DEFAULT_THRESHOLD = 1 << 30  # 1 GiB: above every tensor of a 135M-parameter LM's measurement


def reuse_freed_memory(threshold: int = DEFAULT_THRESHOLD) -> bool:
    """Let glibc's malloc serve allocations up to ``threshold`` bytes from its heap
    (``mallopt(M_MMAP_THRESHOLD)``) and keep every freed byte there for the next allocation
    (``mallopt(M_TRIM_THRESHOLD, -1)``: the heap is never trimmed). Returns whether the setting
    took effect: ``False`` where the C library is not glibc (macOS, Windows, musl), where nothing
    is changed."""
    if not isinstance(threshold, int) or isinstance(threshold, bool) or threshold <= 0:
        raise ValueError(f"threshold must be a positive number of bytes, got {threshold!r}")
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold)) and bool(libc.mallopt(M_TRIM_THRESHOLD, NEVER_TRIM))
