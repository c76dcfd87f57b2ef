"""Whether a checkpoint's files are in the page cache, asked of the kernel (``mincore``) without
reading them. A cold checkpoint is not read ahead (the import of the model's code, which reads its
own files from the same disk, would wait behind gigabytes of weights) and is read past the page
cache (engine option ``io=auto``). Also the typed C memory calls the engines make
(:func:`memory_calls`)."""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
import sys
from typing import Iterable

MAP_FAILED = ctypes.c_void_p(-1).value
PROBES_PER_FILE = 16
COLD_FRACTION = 0.5  # below this share of a checkpoint in the page cache, it is cold


@functools.lru_cache(maxsize=None)
def memory_calls() -> ctypes.CDLL:
    """The C library with the memory calls the engines make typed (``mmap``, ``munmap``,
    ``mremap``, ``mincore``: addresses as pointers, not ints). Linux."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mremap.restype = ctypes.c_void_p
    libc.mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    return libc


def cached_fraction(paths: Iterable[str], probes: int = PROBES_PER_FILE) -> float | None:
    """The share of ``probes`` pages per file, spread evenly over it, that are in the page cache;
    ``None`` where that cannot be asked (not Linux, a file that cannot be mapped) or there is
    nothing to ask about. Maps each file without touching it: nothing is read."""
    if not sys.platform.startswith("linux"):
        return None
    libc = memory_calls()
    page = mmap.PAGESIZE
    resident = asked = 0
    vector = ctypes.create_string_buffer(1)
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return None
        try:
            size = os.fstat(fd).st_size
            if size == 0:
                continue
            address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if address in (None, MAP_FAILED):
                return None
            try:
                pages = -(-size // page)
                for i in range(min(probes, pages)):
                    offset = (pages - 1) * i // max(1, min(probes, pages) - 1) * page
                    if libc.mincore(address + offset, page, vector) != 0:
                        return None
                    resident += vector.raw[0] & 1
                    asked += 1
            finally:
                libc.munmap(address, size)
        finally:
            os.close(fd)
    return resident / asked if asked else None


def is_cold(paths: Iterable[str]) -> bool:
    """Whether less than :data:`COLD_FRACTION` of these files is in the page cache; ``False``
    where that cannot be asked (:func:`cached_fraction` is ``None``)."""
    cached = cached_fraction(paths)
    return cached is not None and cached < COLD_FRACTION
