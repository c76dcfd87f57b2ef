"""Per-stage wall time, first-import time, peak host RSS (sampled) and peak accelerator memory."""

from __future__ import annotations

import importlib
import os
import sys
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def current_rss() -> int:
    """Resident set size of this process in bytes."""
    try:
        with open("/proc/self/statm", "rb") as fh:
            return int(fh.read().split()[1]) * _PAGE
    except OSError:  # not Linux
        import psutil

        return psutil.Process().memory_info().rss


class RssSampler:
    """Samples RSS in a daemon thread; ``peak`` is the highest value seen while running.

    ``ru_maxrss`` would report the peak of the whole process lifetime, not of one load.
    """

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.peak = current_rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="loadstone-rss", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            rss = current_rss()
            if rss > self.peak:
                self.peak = rss

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, current_rss())


def reset_device_peaks() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        for i in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(i)


def device_peaks() -> dict[str, int]:
    """Peak bytes allocated by torch per CUDA device since the last reset (empty without CUDA)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return {}
    return {f"cuda:{i}": int(torch.cuda.max_memory_allocated(i)) for i in range(torch.cuda.device_count())}


# ---------------------------------------------------------------------------- import time
#
# The first stage that touches torch or transformers would otherwise be charged several seconds
# of imports ("inspect 5.19 s" for a 450 KiB model). Every first import of a module runs through
# importlib's ``_find_and_load`` (the ``import`` statement's C code looks it up on the importlib
# module at each call, ``importlib.import_module`` through the module's globals), so wrapping it
# while a stage runs measures exactly the time spent importing, in the thread that imports.
# Modules already imported never reach it and cost nothing.

_bootstrap: Any = sys.modules.get("_frozen_importlib") or importlib._bootstrap  # type: ignore[attr-defined]
_original_find_and_load = _bootstrap._find_and_load
_thread = threading.local()
_install_lock = threading.Lock()
_users = 0


def _timed_find_and_load(*args: Any, **kwargs: Any) -> Any:
    if not getattr(_thread, "timing", 0) or getattr(_thread, "inside", False):
        return _original_find_and_load(*args, **kwargs)
    _thread.inside = True  # a module's own imports are part of its import: count the outermost only
    start = time.perf_counter()
    try:
        return _original_find_and_load(*args, **kwargs)
    finally:
        _thread.inside = False
        _thread.seconds = getattr(_thread, "seconds", 0.0) + time.perf_counter() - start


def import_seconds() -> float:
    """Seconds this thread has spent in first imports while :func:`timing_imports` was active."""
    return getattr(_thread, "seconds", 0.0)


@contextmanager
def timing_imports() -> Iterator[None]:
    """Count this thread's first imports into :func:`import_seconds` while the block runs."""
    global _users
    with _install_lock:
        if _users == 0 and _bootstrap._find_and_load is _original_find_and_load:
            _bootstrap._find_and_load = _timed_find_and_load
        _users += 1
    _thread.timing = getattr(_thread, "timing", 0) + 1
    try:
        yield
    finally:
        _thread.timing -= 1
        with _install_lock:
            _users -= 1
            if _users == 0 and _bootstrap._find_and_load is _timed_find_and_load:
                _bootstrap._find_and_load = _original_find_and_load


#: The key of ``LoadReport.stages`` holding first-import time (not a stage: see ``loadstone.STAGES``).
IMPORTS = "imports"


class StageClock:
    """Times named stages; the current stage name is kept for error reports.

    Time spent importing modules for the first time is taken out of the stage that happened to
    import them and kept under :data:`IMPORTS`, so each stage's figure is its own work.
    """

    def __init__(self) -> None:
        self.timings: dict[str, float] = {IMPORTS: 0.0}
        self.current: str | None = None

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.current = name
        with timing_imports():
            start, imported = time.perf_counter(), import_seconds()
            try:
                yield
            finally:
                importing = import_seconds() - imported
                self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start - importing
                self.timings[IMPORTS] += importing

