"""Stage processes keep freed memory for the next training step instead of returning it to the kernel."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import ctypes, os, sys
from semiprune_core.allocator import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
before = rss()
block = libc.malloc(16 << 20)  # one step's activations, say
ctypes.memset(block, 1, 16 << 20)
libc.free(block)
print(rss() - before)
"""


def retained_after_free(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True).stdout
    return int(out)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only")
def test_freed_step_memory_stays_in_the_process_for_the_next_step():
    assert retained_after_free("default") < 4 << 20  # glibc hands a freed 16 MiB block straight back
    assert retained_after_free("keep") > 12 << 20  # kept: the next step reuses it without page faults
