"""Keep freed memory in the process instead of handing it back to the kernel after every step.

Training allocates and frees the same activation buffers at every step. With glibc's defaults,
buffers above a (dynamic) threshold are mmap-ed and unmapped each time, and whenever more than
128 KiB is free at the top of the heap it is trimmed back to the kernel; each step then pays page
faults to get the memory again. Measured on 2 Sapphire Rapids cores, the evaluate stage
(``fastcnn_s``, batch 256, bf16) trained at 26,000 img/s with the defaults and 34,000 img/s with
this (1.31x). Peak memory is unchanged: what is kept is what the step used a moment before.
"""

from __future__ import annotations

import ctypes
import sys

# mallopt(3) parameters (glibc's malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
TRIM_THRESHOLD = 1 << 30  # give the heap's top back only beyond 1 GiB free
TOP_PAD = 64 << 20        # grow the heap 64 MiB at a time
MMAP_THRESHOLD = 32 << 20  # glibc's largest: blocks up to 32 MiB come from the heap, not from mmap


def keep_freed_memory() -> bool:
    """Set glibc's malloc to keep freed memory for reuse; False where that is not possible (not
    Linux, or a C library without ``mallopt``), which changes nothing but speed."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process already runs on
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all([mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD), mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD),
                mallopt(M_TOP_PAD, TOP_PAD)])
