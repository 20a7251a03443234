"""This process's host memory: what it holds (RSS, its peak), and the few glibc/Linux calls that give
memory back. Linux with glibc; elsewhere each call does nothing and says so."""

from __future__ import annotations

import ctypes
import gc
import os
import sys

_MADV_DONTNEED = 4
_M_MMAP_THRESHOLD = -3
_libc_handle = None


def _libc():
    """The C library (cached), or None where it is not glibc on Linux."""
    global _libc_handle
    if _libc_handle is None:
        try:
            _libc_handle = ctypes.CDLL("libc.so.6", use_errno=True) if sys.platform == "linux" else False
        except OSError:
            _libc_handle = False
    return _libc_handle or None


def status() -> dict:
    """This process's VmRSS, VmHWM (peak RSS), RssAnon and RssFile in bytes (Linux /proc); {} elsewhere."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, val = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                    out[key] = int(val.split()[0]) * 1024
    except OSError:
        pass
    return out


def reset_peak() -> None:
    """Give freed heap pages back to the OS (reusing them then shows as growth) and start the peak
    RSS (VmHWM) again from the current RSS (Linux; elsewhere the collection alone)."""
    gc.collect()
    libc = _libc()
    if libc is None:
        return
    libc.malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def return_large_frees(threshold: int = 1 << 20) -> bool:
    """glibc: serve each allocation of `threshold` bytes or more by its own mapping, given back to the
    OS when freed (mallopt M_MMAP_THRESHOLD). Fixing the threshold also stops glibc from raising it
    (up to 32 MiB) each time such a block is freed, after which same-sized temporaries come from the
    heap and stay in the process's RSS once freed. For a process that streams large tensors through
    memory (regrow). False where it cannot be set."""
    libc = _libc()
    return libc is not None and libc.mallopt(_M_MMAP_THRESHOLD, int(threshold)) == 1


def drop_pages(address: int, nbytes: int) -> None:
    """madvise(MADV_DONTNEED) over the whole pages of [address, address + nbytes). Only for memory
    mapped privately from a file and never written: its pages leave this process's RSS and fault back
    from the page cache when read again. On anonymous memory it would zero the data."""
    libc = _libc()
    if libc is None or nbytes <= 0:
        return
    page = os.sysconf("SC_PAGE_SIZE")
    start, end = address - address % page, -(-(address + nbytes) // page) * page
    libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED)
