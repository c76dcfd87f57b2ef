"""Memory maps of checkpoint files that a file lease keeps correct while the file changes.

A tensor that is a view of its checkpoint's pages (``MAP_PRIVATE``, as ``from_pretrained`` keeps
CPU weights) costs no read and no copy, but it dies with SIGBUS at its next use once the file is
truncated, and silently takes the new bytes when the file is rewritten in place: saving a model
over the folder it was loaded from does both.

A read lease (``fcntl(F_SETLEASE, F_RDLCK)``, Linux) closes that hole: the kernel makes any process,
this one included, that opens the file for writing or truncates it wait until the lease holder
lets go, and tells the holder first. A watcher thread of this module waits for that signal, copies
every range the model uses out of the mapping into anonymous memory, puts the copy in the mapping's
place at the same address (``mremap``, so every tensor and view stays valid and keeps the bytes it
had, its own writes included), then lets go. The writer goes on a moment later; the model no longer
reads the file.

A lease is granted only to the file's owner (or with ``CAP_LEASE``), on a local file system that
supports it, while no one has the file open for writing: where it is refused, :func:`lease_map`
says why and the caller reads the file instead (or maps it unprotected, where asked to).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import mmap
import os
import signal
import struct
import sys
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .page_cache import MAP_FAILED, memory_calls

log = logging.getLogger("loadstone.leases")
F_SETOWN_EX, F_OWNER_TID = 15, 0  # fcntl(2); the fcntl module names neither
MREMAP_MAYMOVE, MREMAP_FIXED = 1, 2
# SIGURG is ignored by default: were it ever sent elsewhere than the watcher, nothing would die.
LEASE_SIGNAL = signal.SIGURG
# How fast a break must copy at the least to be done within the kernel's lease-break time (the
# writer goes on after it, lease or not): 256 MiB took 0.10-0.14 s (1.9-2.7 GB/s) with 4 threads
# on the 2-core machine, so a floor well below that.
MIN_COPY_BYTES_PER_S = 500 << 20
COPY_PART = 64 << 20

_REFUSED = {
    errno.EAGAIN: "the file is open for writing (or memory-mapped writable) elsewhere",
    errno.EACCES: "this user does not own the file and lacks CAP_LEASE",
    errno.EPERM: "this user does not own the file and lacks CAP_LEASE",
    errno.EINVAL: "its file system does not support leases, or /proc/sys/fs/leases-enable is 0",
    errno.ENOLCK: "the kernel has no lease left to give",
}


@dataclass
class _Leased:
    """One leased mapping: the watcher's own descriptor (holding the lease), where the mapping is,
    and which byte ranges of it tensors use."""

    fd: int
    path: Path
    mapping: "weakref.ref[mmap.mmap]"
    address: int
    size: int
    ranges: list[tuple[int, int]] = field(default_factory=list)
    # every range tensors will use is in ``ranges`` (the load that maps the file has ended); until
    # then a break copies the whole file, so that views made after it still hold the planned bytes
    complete: bool = False


@dataclass
class Broken:
    """What one lease break did: the file, how many of its bytes were copied out of it into the
    process's own memory, and in how many seconds."""

    path: Path
    copied: int
    seconds: float = 0.0
    error: str | None = None  # why the copy failed: the mapping reads the changed file from then on


class _Watcher:
    """The thread that waits for lease breaks (one per process, started with the first lease)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.leased: dict[int, _Leased] = {}  # by fd
        self.by_mapping: dict[int, _Leased] = {}  # by id() of the mapping, while it lives
        self.pid = os.getpid()
        self.ready = threading.Event()
        self.tid = 0
        self.thread = threading.Thread(target=self._run, name="loadstone-leases", daemon=True)
        self.thread.start()
        self.ready.wait()

    def _run(self) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, {LEASE_SIGNAL})  # kept pending here for sigwaitinfo
        self.tid = threading.get_native_id()
        self.ready.set()
        while True:
            signal.sigwaitinfo({LEASE_SIGNAL})
            if self._idle():
                return
            with self.lock:
                breaking = [entry for entry in self.leased.values() if _lease_of(entry.fd) != fcntl.F_RDLCK]
                for entry in breaking:
                    started = time.perf_counter()
                    try:
                        broken = Broken(entry.path, _materialize(entry), time.perf_counter() - started)
                        log.info("%s is being rewritten or truncated: %d bytes of the model were copied out of it "
                                 "first (%.2f s)", entry.path, broken.copied, broken.seconds)
                    except Exception as exc:  # noqa: BLE001 - the thread must live on, and the writer must
                        # not wait out the lease-break time for nothing
                        broken = Broken(entry.path, 0, time.perf_counter() - started, f"{type(exc).__name__}: {exc}")
                        log.warning("%s is being rewritten or truncated, and the model's bytes could not be copied "
                                    "out of it (%s): the model reads the changed file from now on", entry.path,
                                    broken.error)
                    _broken.append(broken)
                    self._let_go(entry)
            if self._idle():
                return

    def _idle(self) -> bool:
        """Whether nothing is leased any more: the thread then ends (a new lease starts another),
        so that no thread is left behind by models that are gone (a later fork() warns of it)."""
        global _watcher
        with _watcher_lock, self.lock:  # lease_map registers under _watcher_lock: never half-way
            if self.leased:
                return False
            if _watcher is self:
                _watcher = None
            return True

    def _let_go(self, entry: _Leased) -> None:
        """Ends the lease and the watch (the caller holds the lock)."""
        if self.leased.pop(entry.fd, None) is None:
            return
        self.by_mapping = {key: e for key, e in self.by_mapping.items() if e is not entry}
        _unlease(entry.fd)

    def forget(self, entry: _Leased) -> None:
        """The mapping is gone (its last tensor was freed): the file is no concern of it any more."""
        if os.getpid() != self.pid:
            return  # a child made by fork(): the lease, on the file description it shares, is the parent's
        with self.lock:
            if self.leased.get(entry.fd) is entry:  # not a later lease that reuses the fd's number
                self._let_go(entry)
        self.wake_if_idle()

    def wake_if_idle(self) -> None:
        """Nothing is leased: wake the thread, which then ends (see :meth:`_idle`)."""
        with self.lock:
            idle = not self.leased
        if idle and self.thread.is_alive() and self.thread.ident is not None:
            try:
                signal.pthread_kill(self.thread.ident, LEASE_SIGNAL)
            except OSError:
                pass  # it ended in between


_watcher: _Watcher | None = None
_watcher_lock = threading.Lock()
_broken: list[Broken] = []  # every break answered, by whichever watcher was running


def _the_watcher() -> _Watcher:
    """The running watcher, started if there is none (the caller holds ``_watcher_lock``)."""
    global _watcher
    # a child made by fork() inherits the object but not its thread
    if _watcher is None or _watcher.pid != os.getpid():
        _watcher = _Watcher()
    return _watcher


def _unlease(fd: int) -> None:
    """Ends the lease on ``fd`` and closes it."""
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
    except OSError:
        pass  # the kernel ended it already (its lease-break time ran out)
    finally:
        os.close(fd)


def _lease_of(fd: int) -> int:
    try:
        return fcntl.fcntl(fd, fcntl.F_GETLEASE)
    except OSError:
        return fcntl.F_UNLCK


def lease_break_seconds() -> float:
    """How long the kernel lets a lease holder keep a writer waiting (``lease-break-time``)."""
    try:
        return float(Path("/proc/sys/fs/lease-break-time").read_text())
    except (OSError, ValueError):
        return 45.0


def leases_supported() -> bool:
    """Whether this platform has read leases and the calls the watcher needs (Linux)."""
    return sys.platform.startswith("linux") and hasattr(fcntl, "F_SETLEASE") and hasattr(signal, "sigwaitinfo")


def lease_map(path: Path, expected: tuple[int, int] | None) -> tuple[mmap.mmap | None, str | None]:
    """A copy-on-write map of the whole file under a read lease, and ``None``; or ``None`` and why
    no lease could be had (nothing is mapped then).

    :param expected: the file's ``(size, mtime_ns)`` when the plan read its header; checked once the
        lease is held, so the bytes mapped are the planned ones and stay so.
    :raises CheckpointError: the file changed since the plan read it.
    """
    from ..contract.checkpoint import changed_file_error

    if not leases_supported():
        return None, "leases are a Linux feature"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        return None, f"it cannot be opened: {exc.strerror or exc}"
    size = os.fstat(fd).st_size
    allowed = lease_break_seconds() * MIN_COPY_BYTES_PER_S
    if size > allowed:
        os.close(fd)
        return None, (f"{size / 1e9:.1f} GB could not be copied out within the kernel's lease-break time "
                      f"({lease_break_seconds():g} s, /proc/sys/fs/lease-break-time)")
    with _watcher_lock:  # the watcher cannot end between taking the lease and watching it
        watcher = _the_watcher()
        try:
            fcntl.fcntl(fd, fcntl.F_SETSIG, LEASE_SIGNAL)
            fcntl.fcntl(fd, F_SETOWN_EX, struct.pack("ii", F_OWNER_TID, watcher.tid))
            fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
        except OSError as exc:
            os.close(fd)
            watcher.wake_if_idle()
            return None, _REFUSED.get(exc.errno, f"the kernel refused a lease: {exc.strerror or exc}")
        st = os.fstat(fd)
        if expected is not None and (st.st_size, st.st_mtime_ns) != expected:
            _unlease(fd)
            watcher.wake_if_idle()
            raise changed_file_error(path, expected, (st.st_size, st.st_mtime_ns), "before it was mapped")
        try:
            mapping = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)
        except (OSError, ValueError) as exc:
            _unlease(fd)
            watcher.wake_if_idle()
            return None, f"it cannot be memory-mapped: {exc}"
        anchor = ctypes.c_char.from_buffer(mapping)
        address = ctypes.addressof(anchor)
        del anchor  # an exported buffer would keep the mapping from ever closing
        entry = _Leased(fd, path, weakref.ref(mapping), address, len(mapping))
        with watcher.lock:
            watcher.leased[fd] = entry
            watcher.by_mapping[id(mapping)] = entry
    weakref.finalize(mapping, watcher.forget, entry)
    return mapping, None


def note_use(mapping: mmap.mmap, start: int, end: int) -> None:
    """Bytes ``[start, end)`` of a leased mapping are a tensor's: a lease break copies them out."""
    entry = _entry_of(mapping)
    if entry is not None:
        entry.ranges.append((start, end))


def noted_all(mapping: mmap.mmap) -> None:
    """Every tensor of this mapping is made: from now on a lease break copies the used ranges only."""
    entry = _entry_of(mapping)
    if entry is not None:
        entry.complete = True


def release_pages(mapping: mmap.mmap, start: int, end: int) -> bool:
    """Give back the pages wholly inside bytes ``[start, end)`` of a leased mapping that still maps
    its file (no break has copied it out): touched again, they are read from the file again. A
    tensor that only passes through (a weight packed as soon as it is read) no longer counts in the
    process's memory once it is done. Returns ``False``, and gives back nothing, where the mapping
    was copied out or is not leased here: its pages may then be the only copy of those bytes.
    Under the watcher's lock, so that no break copies the mapping meanwhile."""
    watcher = _watcher
    if watcher is None or watcher.pid != os.getpid():
        return False
    with watcher.lock:
        entry = watcher.by_mapping.get(id(mapping))
        if entry is None or entry.mapping() is not mapping:
            return False
        drop_pages(mapping, start, end)
        return True


def drop_pages(mapping: mmap.mmap, start: int, end: int) -> None:
    """``MADV_DONTNEED`` the pages wholly inside ``[start, end)`` of a file-backed private mapping
    (pages shared with a neighbouring tensor stay)."""
    page = mmap.PAGESIZE
    first, last = -(-start // page) * page, end // page * page
    if last > first:
        mapping.madvise(mmap.MADV_DONTNEED, first, last - first)


def _entry_of(mapping: mmap.mmap) -> _Leased | None:
    watcher = _watcher
    if watcher is None or watcher.pid != os.getpid():  # a child made by fork() maps under no lease of its own
        return None
    with watcher.lock:
        entry = watcher.by_mapping.get(id(mapping))
        return entry if entry is not None and entry.mapping() is mapping else None


def breaks_seen() -> list[Broken]:
    """Every lease break this process has answered so far, oldest first."""
    return list(_broken)


def _materialize(entry: _Leased) -> int:
    """Puts anonymous memory holding the used ranges' current bytes in place of the file's pages;
    the bytes copied. Ranges no tensor uses become zero pages, which take no memory; while the load
    that maps the file still runs, every byte is used."""
    mapping = entry.mapping()
    if mapping is None or mapping.closed:
        return 0
    libc = memory_calls()
    fresh = libc.mmap(None, entry.size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                      -1, 0)
    if fresh in (None, MAP_FAILED):
        raise OSError(ctypes.get_errno(), "mmap of anonymous memory for a lease break failed")
    page = mmap.PAGESIZE
    ranges = entry.ranges if entry.complete else [(0, entry.size)]
    pages = [(start // page * page, min(entry.size, -(-end // page) * page)) for start, end in ranges]
    parts = [(s, min(end, s + COPY_PART)) for start, end in _merged(pages) for s in range(start, end, COPY_PART)]
    with ThreadPoolExecutor(max_workers=4, thread_name_prefix="loadstone-lease-copy") as pool:
        # ctypes releases the GIL around memmove: the parts copy in parallel
        list(pool.map(lambda part: ctypes.memmove(fresh + part[0], entry.address + part[0], part[1] - part[0]),
                      parts))
    moved = libc.mremap(fresh, entry.size, entry.size, MREMAP_MAYMOVE | MREMAP_FIXED, entry.address)
    if moved != entry.address:
        libc.munmap(fresh, entry.size)
        raise OSError(ctypes.get_errno(), "mremap over a leased mapping failed")
    return sum(end - start for start, end in parts)


def _merged(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged
