"""Helpers for the fault tests: forked children that load (torch and transformers are already
imported, so a child starts in milliseconds instead of seconds), what they report, and the
disk map whose offloaded layers are written into the offload folder."""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

# Mixtral: its experts are fused on load, so its offloaded layer is re-saved into the offload
# folder (plain safetensors tensors would be read from the checkpoint in place).
MIXTRAL_DISK_MAP = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                    "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}


def files_under(folder: Path) -> list[str]:
    """Every file and folder below ``folder``, as sorted relative paths (empty if it is gone)."""
    if not folder.exists():
        return []
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def logits(model: Any) -> Any:
    import torch

    with torch.no_grad():
        return model(torch.arange(12).reshape(1, 12)).logits


@dataclass
class Child:
    """A forked child running one function; ``report`` holds what it returned or raised."""

    pid: int
    report: Path

    def wait(self, timeout: float = 180) -> int:
        """The exit status as ``subprocess`` gives it: the exit code, or ``-signal``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.02)
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        raise AssertionError(f"child {self.pid} did not finish within {timeout} s")

    def result(self) -> dict[str, Any] | None:
        return json.loads(self.report.read_text()) if self.report.exists() else None


def fork(target: Callable[..., Any], *args: Any, report: Path) -> Child:
    """Run ``target(*args)`` in a forked child that starts as a plain program would: SIGTERM and
    SIGHUP at their default action, SIGINT raising KeyboardInterrupt (torch on one thread). Whatever ``target``
    returns (JSON) or raises is written to ``report``; the child never returns into pytest."""
    pid = os.fork()
    if pid:
        return Child(pid, report)
    code = 0
    try:
        # GNU OpenMP hangs in a forked child at its first parallel region once the parent has run one
        # (a forward in an earlier test): the child computes on one thread.
        import torch

        torch.set_num_threads(1)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        outcome: dict[str, Any] = {"returned": target(*args)}
    except BaseException as exc:
        cause = exc.__cause__
        outcome = {"raised": type(exc).__name__, "message": str(exc), "file": getattr(exc, "file", None),
                   "field": getattr(exc, "field", None),
                   "cause": f"{type(cause).__name__}: {cause}" if cause is not None else None}
        code = 1
    try:
        report.write_text(json.dumps(outcome))
    finally:
        os._exit(code)


def wait_for(path: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(0.02)
