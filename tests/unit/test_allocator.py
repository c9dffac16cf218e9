"""keep_freed_memory: a large block freed by one scoring batch is reused by the next
instead of being mapped afresh (one page fault per 4 KiB page, every batch)."""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap

import pytest

# Mallocs, fills and frees a 64 MiB block (above glibc's largest mmap threshold, like a
# scoring batch's feed-forward activations) four times; prints the minor page faults of
# each round. The C allocator is called directly so that no other allocator's caching
# (numpy's huge pages, Python's arenas) hides what malloc does.
_PROBE = textwrap.dedent("""
    import ctypes, resource, sys
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    if sys.argv[1] == "keep":
        from streamrank.allocator import keep_freed_memory
        assert keep_freed_memory() is True
        assert keep_freed_memory() is True  # once per process; a second call changes nothing
    size = 64 << 20
    rounds = []
    for _ in range(4):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = libc.malloc(size)
        libc.memset(block, 1, size)
        libc.free(block)
        rounds.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(*rounds)
""")

PAGES = (64 << 20) // 4096


def _faults(mode: str) -> list[int]:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True)
    return [int(n) for n in out.stdout.split()]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt and its mmap threshold are glibc's")
def test_a_freed_large_block_is_reused_instead_of_faulted_in_again() -> None:
    default = _faults("default")
    assert min(default) > PAGES // 2, f"glibc's default should map each 64 MiB block afresh: {default}"
    kept = _faults("keep")
    assert kept[0] > PAGES // 2, kept  # the first block is new memory either way
    assert max(kept[1:]) < PAGES // 20, f"the freed block was not reused: faults per round {kept} (default {default})"
