"""Real signals during a load, delivered by another process as SLURM, docker and ``timeout`` do:
SIGTERM and SIGHUP clean up like Ctrl-C (offloaded files gone, ``loadstone_load_failed`` hooks
run), then the process ends by that signal; handlers a program set itself are left to do their
job; loadstone's handlers exist only while a load runs, in the main thread."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

import loadstone
from loadstone import hookimpl

sys.path.insert(0, str(Path(__file__).parent))  # tests/ is not a package (--import-mode=importlib)
from fault_support import MIXTRAL_DISK_MAP, fork, files_under, logits, wait_for  # noqa: E402


@pytest.fixture(scope="module")
def mixtral(tiny_checkpoint) -> str:
    return str(tiny_checkpoint("mixtral"))


def _say(path: Path, value: object) -> None:
    """Write ``value`` as JSON so that a reader never sees half of it."""
    part = path.with_suffix(".part")
    part.write_text(json.dumps(value))
    os.replace(part, path)


class PauseMidLoad:
    """A plugin in the child: once the load is mid-way it says so (listing what is in the offload
    folder), then waits for the parent's signal (or for ``until()``); it records the error the load
    failed with. ``in_hook=False``: something else calls :meth:`pause`."""

    def __init__(self, offload: Path, ready: Path, failed: Path, *, until=None, in_hook: bool = True):
        self.offload, self.ready, self.failed, self.until, self.in_hook = offload, ready, failed, until, in_hook

    def pause(self) -> None:
        _say(self.ready, files_under(self.offload))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (self.until and self.until()):
            time.sleep(0.01)  # the signal's handler runs here, in the main thread

    @hookimpl
    def loadstone_model_loaded(self):
        if self.in_hook:
            self.pause()

    @hookimpl
    def loadstone_load_failed(self, error):
        _say(self.failed, type(error).__name__)


def _pause_inside_the_engine(pauser: PauseMidLoad):
    """A torch function mode that pauses inside ``from_pretrained``, right after its first
    offloaded tensor reached the disk (the others are still to be written)."""
    from torch.overrides import TorchFunctionMode

    class PauseOnceOffloading(TorchFunctionMode):
        paused = False

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if not self.paused and any(n.endswith(".safetensors") for n in files_under(pauser.offload)):
                self.paused = True
                pauser.pause()
            return func(*args, **(kwargs or {}))

    return PauseOnceOffloading()


def _load_and_pause(checkpoint: str, offload: Path, ready: Path, failed: Path, where: str) -> dict:
    pauser = PauseMidLoad(offload, ready, failed, in_hook=where == "after the weights")
    mode = contextlib.nullcontext() if pauser.in_hook else _pause_inside_the_engine(pauser)
    with mode:
        loadstone.load(checkpoint, plugins=loadstone.PluginManager(extra_plugins=[("pause", pauser)]),
                       placement=MIXTRAL_DISK_MAP, offload_folder=str(offload), progress=False)
    return {"loaded": True}


@pytest.mark.parametrize("where", ["after the weights", "inside from_pretrained"])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT], ids=["TERM", "HUP", "INT"])
def test_a_signal_mid_load_removes_the_offloaded_files(signum, where, mixtral, tmp_path):
    offload = tmp_path / "offload"
    offload.mkdir()
    (offload / "notes.txt").write_text("the user's own file")
    ready, failed = tmp_path / "ready.json", tmp_path / "failed.json"
    child = fork(_load_and_pause, mixtral, offload, ready, failed, where, report=tmp_path / "child.json")
    wait_for(ready)
    written = json.loads(ready.read_text())
    assert any(name.endswith(".safetensors") for name in written), f"nothing offloaded yet: {written}"
    os.kill(child.pid, signum)  # from another process, as SLURM or `timeout` send it
    status = child.wait()
    assert files_under(offload) == ["notes.txt"], "the signalled load left files behind"
    if signum == signal.SIGINT:  # Python's own handler: KeyboardInterrupt reaches the program
        assert json.loads(failed.read_text()) == "KeyboardInterrupt"
        assert child.result()["raised"] == "KeyboardInterrupt" and status == 1
    else:  # unwound like Ctrl-C, then ended by the signal itself: what the parent would see without loadstone
        assert json.loads(failed.read_text()) == "TerminatedBySignal"
        assert status == -signum and child.result() is None


def _load_with_own_handler(checkpoint: str, offload: Path, ready: Path, failed: Path, behaviour: str) -> dict:
    received = []

    def handler(signum, frame):
        received.append(signum)
        if behaviour == "exits":
            sys.exit(3)

    signal.signal(signal.SIGTERM, handler)
    pauser = PauseMidLoad(offload, ready, failed, until=lambda: bool(received))
    loaded = loadstone.load(checkpoint, plugins=loadstone.PluginManager(extra_plugins=[("pause", pauser)]),
                            placement=MIXTRAL_DISK_MAP, offload_folder=str(offload), progress=False)
    return {"received": received, "handler_kept": signal.getsignal(signal.SIGTERM) is handler,
            "logits": logits(loaded.model).sum().item(), "files": files_under(offload)}


def test_a_programs_own_handler_decides(mixtral, tmp_path):
    """A trainer that stops gracefully on SIGTERM (records it, finishes its step) keeps doing so: the
    load goes on and succeeds; one whose handler exits gets the load's cleanup on the way out."""
    for behaviour in ("records", "exits"):
        offload = tmp_path / behaviour
        ready, failed = tmp_path / f"{behaviour}-ready.json", tmp_path / f"{behaviour}-failed.json"
        child = fork(_load_with_own_handler, mixtral, offload, ready, failed, behaviour,
                     report=tmp_path / f"{behaviour}.json")
        wait_for(ready)
        os.kill(child.pid, signal.SIGTERM)
        status = child.wait()
        outcome = child.result()
        if behaviour == "records":
            assert status == 0, outcome
            got = outcome["returned"]
            assert got["received"] == [signal.SIGTERM] and got["handler_kept"]
            assert any(name.endswith(".safetensors") for name in got["files"])
        else:
            assert status == 1 and outcome["raised"] == "SystemExit" and outcome["message"] == "3"
            assert json.loads(failed.read_text()) == "SystemExit"
            assert files_under(offload) == []


def test_handlers_exist_only_during_a_load_in_the_main_thread(tiny_checkpoint, monkeypatch):
    checkpoint = str(tiny_checkpoint("llama"))
    seen = {}

    class Look:
        @hookimpl
        def loadstone_model_loaded(self):
            seen[threading.current_thread() is threading.main_thread()] = signal.getsignal(signal.SIGTERM)

    plugins = loadstone.PluginManager(extra_plugins=[("look", Look())])
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a plain program's SIGTERM
    try:
        before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)}
        loadstone.load(checkpoint, plugins=plugins, placement="cpu", progress=False)
        worker = threading.Thread(target=loadstone.load, args=(checkpoint,),
                                  kwargs={"plugins": plugins, "placement": "cpu", "progress": False})
        worker.start()
        worker.join(120)
        after = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)}
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert callable(seen[True]) and seen[True] is not signal.SIG_DFL, "no handler during the main-thread load"
    assert seen[False] is signal.SIG_DFL, "a load outside the main thread touched the handlers"
    assert after == before


def _load_beside_and_pause(checkpoint: str, shared: Path, ready: Path, failed: Path) -> dict:
    pauser = PauseMidLoad(shared, ready, failed)
    loadstone.load(checkpoint, plugins=loadstone.PluginManager(extra_plugins=[("pause", pauser)]),
                   placement=MIXTRAL_DISK_MAP, offload_folder=str(shared), progress=False)
    return {"loaded": True}


def test_a_terminated_process_leaves_another_processes_offload_alone(mixtral, tmp_path):
    import torch

    reference = logits(loadstone.load(mixtral, placement="cpu", progress=False).model)
    shared = tmp_path / "shared"
    mine = loadstone.load(mixtral, placement=MIXTRAL_DISK_MAP, offload_folder=str(shared), progress=False)
    kept = files_under(shared)
    # A second process (forked from this one, so it knows this process's offload folder) loads
    # into the same folder and is terminated mid-load.
    ready, failed = tmp_path / "ready.json", tmp_path / "failed.json"
    child = fork(_load_beside_and_pause, mixtral, shared, ready, failed, report=tmp_path / "child.json")
    wait_for(ready)
    assert len(json.loads(ready.read_text())) > len(kept)
    os.kill(child.pid, signal.SIGTERM)
    assert child.wait() == -signal.SIGTERM
    assert files_under(shared) == kept
    torch.testing.assert_close(logits(mine.model), reference, rtol=0, atol=0)
