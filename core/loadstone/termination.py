"""Signals that end the process clean up a load the way Ctrl-C does.

SLURM, docker and ``timeout`` stop a job with SIGTERM (SIGHUP when a terminal goes away). Left at
its default action, such a signal ends the process on the spot and a load in progress leaves its
offloaded weights behind. While a load runs, :func:`signals_unwind_the_load` turns each of those
signals whose handler is still the default into an exception (:class:`TerminatedBySignal`), so
the load unwinds exactly as for Ctrl-C (its files are removed, ``loadstone_load_failed`` hooks
run), and then ends the process by the same signal, with the default action restored: the parent
sees the status it would have seen without loadstone (killed by SIGTERM, 143 in a shell).

SIGINT is handled the same way only where a program set it back to its default action; Python's
own SIGINT handler (``KeyboardInterrupt``) already unwinds the load, and is left alone.

What it leaves alone:

* a handler the program installed itself (a Python function, or ``SIG_IGN``): that handler
  runs as it would without loadstone. If it raises (``sys.exit()`` in a SIGTERM handler), the
  load unwinds and cleans up like for any exception; if it only records the request (a graceful
  shutdown flag), the load goes on;
* loads outside the main thread: Python runs signal handlers in the main thread only, so nothing
  is installed there; but when a main-thread load ends the process this way, the offload files of
  every load of the process are removed first;
* the time after the load: the previous handlers are restored as the load returns or fails.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Any, Iterator

from .faults import remove_every_workspace

#: the signals whose default action ends the process without cleanup and that job managers send
ENDING_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP", "SIGINT") if hasattr(signal, name))


class TerminatedBySignal(BaseException):
    """A signal asked the process to end during a load; the load unwinds, then the process ends.

    A ``BaseException`` like ``KeyboardInterrupt``: code that catches ``Exception`` must not
    swallow it. ``loadstone_load_failed`` hooks receive it as ``error``.
    """

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"load stopped by {signal.Signals(signum).name}")


class _Unwinding:
    """The handler: raises :class:`TerminatedBySignal` once. A second signal while unwinding, or
    one arriving while the handlers are being restored, is only recorded: the process ends anyway."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.closing = False

    def __call__(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            return
        self.signum = signum
        if not self.closing:
            raise TerminatedBySignal(signum)


@contextlib.contextmanager
def signals_unwind_the_load() -> Iterator[None]:
    """For the duration of the block, in the main thread: every signal of :data:`ENDING_SIGNALS`
    whose handler is the default (``SIG_DFL``) unwinds the block, then ends the process by that
    signal. Other handlers stay as they are; the previous handlers are restored on exit."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handler = _Unwinding()
    installed: dict[int, Any] = {}
    try:
        for signum in ENDING_SIGNALS:
            if signal.getsignal(signum) is signal.SIG_DFL:
                installed[signum] = signal.signal(signum, handler)
        yield
    except TerminatedBySignal:
        if not installed:  # an outer load's handler raised it: that load unwinds, then ends the process
            raise
    finally:
        handler.closing = True
        _restore(installed)
        if handler.signum is not None:  # also when code inside the block swallowed the exception
            _end_process(handler.signum)


def _restore(installed: dict[int, Any]) -> None:
    for signum, previous in installed.items():
        signal.signal(signum, previous)


def _end_process(signum: int) -> None:
    """End this process by ``signum`` with its default action, after the unwinding removed this
    load's files: the exit status says "killed by signal", as it would have without loadstone."""
    remove_every_workspace()  # loads in other threads, and loaded models' files: the process ends
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    signal.signal(signum, signal.SIG_DFL)
    signal.raise_signal(signum)
    os._exit(128 + signum)  # only if the signal is blocked in this thread
