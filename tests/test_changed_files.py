"""A checkpoint file that changes after the plan read its header (truncated, grown, rewritten,
deleted), between the plan and the load or while the engine reads it, is refused with a
CheckpointError naming the file, by every engine; never a SIGBUS, never weights from another
file than the one planned."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import threading
from pathlib import Path
from typing import Iterator

import pytest

import loadstone
from loadstone import CheckpointError, hookimpl

sys.path.insert(0, str(Path(__file__).parent))  # tests/ is not a package (--import-mode=importlib)
from fault_support import fork, logits  # noqa: E402

ENGINES = ["loadstone", "transformers"]


@pytest.fixture
def sharded(tiny_checkpoint, tmp_path) -> Path:
    """A private copy of a three-shard checkpoint: these tests damage it."""
    return Path(shutil.copytree(tiny_checkpoint("llama", max_shard_size="200KB"), tmp_path / "llama"))


def _shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def change(path: Path, how: str) -> None:
    """Damage ``path`` the way a copy, a download or a save still running would."""
    st = path.stat()
    if how == "truncated":
        os.truncate(path, st.st_size // 2)
    elif how == "grown":
        with open(path, "ab") as fh:
            fh.write(b"\0" * 4096)
    elif how == "rewritten":  # same size, other weights: only the mtime tells
        data = bytearray(path.read_bytes())
        data[-64:] = bytes(64)
        path.write_bytes(bytes(data))
    elif how == "deleted":
        path.unlink()
        return
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # a coarse clock still moves


class ChangeAfterPlan:
    def __init__(self, path: Path, how: str):
        self.path, self.how = path, how

    @hookimpl
    def loadstone_after_plan(self):
        change(self.path, self.how)


@pytest.mark.parametrize("how", ["truncated", "grown", "rewritten", "deleted"])
@pytest.mark.parametrize("engine", ENGINES)
def test_a_file_changed_between_the_plan_and_the_load_is_refused(engine, how, sharded):
    victim = _shards(sharded)[1]
    plugins = loadstone.PluginManager(extra_plugins=[("rewrite", ChangeAfterPlan(victim, how))])
    with pytest.raises(CheckpointError) as caught:
        loadstone.load(str(sharded), plugins=plugins, placement="cpu", engine=engine, progress=False)
    error = caught.value
    assert error.file == str(victim) and victim.name in error.message
    assert "between the plan and the load" in error.message
    if how != "deleted":
        assert how in error.message and error.field == "file size and mtime"


def test_a_pickle_file_changed_between_the_plan_and_the_load_is_refused(tiny_checkpoint, tmp_path):
    import torch
    from safetensors.torch import load_file

    folder = Path(shutil.copytree(tiny_checkpoint("llama"), tmp_path / "llama"))
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    victim = folder / "pytorch_model.bin"
    plugins = loadstone.PluginManager(extra_plugins=[("rewrite", ChangeAfterPlan(victim, "truncated"))])
    with pytest.raises(CheckpointError) as caught:
        loadstone.load(str(folder), plugins=plugins, placement="cpu", allow_pickle=True, progress=False)
    assert caught.value.file == str(victim) and "truncated" in caught.value.message


def _change_on_first_read(folder: Path, how: str):
    """A torch function mode that damages every shard at the first torch call, once armed, on a
    tensor shaped like a checkpoint matrix: one read from the files (buffers made while the model
    is built are vectors), so the engine has opened its files and is reading them."""
    import torch
    from torch.overrides import TorchFunctionMode

    shards = _shards(folder)
    read_shapes = {info.shape for info in loadstone.plan(str(folder), placement="cpu").inventory.tensors.values()
                   if len(info.shape) == 2}

    class ChangeOnFirstRead(TorchFunctionMode):
        armed, done = False, False

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if self.armed and not self.done:
                tensors = [a for a in (*args, *(kwargs or {}).values()) if isinstance(a, torch.Tensor)]
                if any(t.device.type != "meta" and tuple(t.shape) in read_shapes for t in tensors):
                    self.done = True
                    for shard in shards:
                        change(shard, how)
            return func(*args, **(kwargs or {}))

    return ChangeOnFirstRead()


class Arm:
    def __init__(self, mode):
        self.mode = mode

    @hookimpl
    def loadstone_after_plan(self):
        self.mode.armed = True


@contextlib.contextmanager
def _change_at_second_pread(folder: Path, how: str) -> Iterator[list]:
    """Damage every shard right before the second ``os.preadv`` call of any thread: the native
    engine's reader thread has opened the first shard and read its first tensor."""
    shards, calls = _shards(folder), []

    def profile(frame, event, arg):
        if event == "c_call" and arg is os.preadv:
            calls.append(arg)
            if len(calls) == 2:
                for shard in shards:
                    change(shard, how)

    threading.setprofile(profile)  # reader threads start during the load
    sys.setprofile(profile)
    try:
        yield calls
    finally:
        sys.setprofile(None)
        threading.setprofile(None)


def _load_while_changing(folder: str, engine: str, how: str) -> dict:
    if engine == "loadstone":  # one reader thread: its reads come in file order
        with _change_at_second_pread(Path(folder), how) as calls:
            loadstone.load(folder, placement="cpu", engine=engine, engine_options={"readers": 1, "reader": "pread"},
                           progress=False)
        return {"changed": len(calls) >= 2}
    # from_pretrained reads in a thread pool unless told not to; in the caller's thread, the torch
    # mode sees the first tensor read and the reads that follow it meet the damaged files.
    os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = "1"
    mode = _change_on_first_read(Path(folder), how)
    plugins = loadstone.PluginManager(extra_plugins=[("arm", Arm(mode))])
    with mode:
        loadstone.load(folder, plugins=plugins, placement="cpu", engine=engine, progress=False)
    return {"changed": mode.done}


def _from_pretrained_while_changing(folder: str, how: str) -> dict:
    from transformers import AutoModelForCausalLM

    os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = "1"
    mode = _change_on_first_read(Path(folder), how)
    mode.armed = True
    with mode:
        model = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu")
    # The weights are the mapped file's pages: the first use of a lost one kills the process
    # (if the load itself did not touch one already).
    return {"changed": mode.done, "sum": sum(float(p.sum()) for p in model.parameters())}


@pytest.mark.parametrize("how", ["truncated", "rewritten"])
@pytest.mark.parametrize("engine", ENGINES)
def test_a_file_changed_while_the_engine_reads_it_is_refused(engine, how, sharded, tmp_path):
    # In a child process: if a truncation killed it (SIGBUS), only the child dies.
    child = fork(_load_while_changing, str(sharded), engine, how, report=tmp_path / "child.json")
    status = child.wait()
    assert status == 1, f"exit status {status} ({-signal.SIGBUS} is SIGBUS)"
    outcome = child.result()
    assert outcome["raised"] == "CheckpointError", outcome
    assert outcome["file"] in {str(p) for p in _shards(sharded)}
    assert Path(outcome["file"]).name in outcome["message"]
    if how == "truncated":  # loadstone's reader (from_pretrained's too) came up short and names the tensor
        assert "ended while tensor" in outcome["message"] and outcome["field"] == "file size", outcome
    if how == "rewritten":  # no read fails: the native reader sees it as it opens the next shard,
        # the transformers engine (every shard opened up front) in the check after it finished
        moment = "changed before it was read" if engine == "loadstone" else "changed during the load"
        assert moment in outcome["message"] and "rewritten" in outcome["message"]


def test_the_same_truncation_kills_a_memory_mapped_reader(sharded, tmp_path):
    """What the test above guards against: transformers' own (memory-mapped) read of a file
    truncated under it ends the process with SIGBUS."""
    child = fork(_from_pretrained_while_changing, str(sharded), "truncated", report=tmp_path / "child.json")
    status = child.wait()
    assert status == -signal.SIGBUS, (status, child.result())


def _forward_after_truncation(folder: str, engine: str) -> dict:
    import torch

    loaded = loadstone.load(folder, placement="cpu", engine=engine, progress=False)
    before = logits(loaded.model)
    for shard in _shards(Path(folder)):
        change(shard, "truncated")
    return {"same": bool(torch.equal(logits(loaded.model), before))}


@pytest.mark.parametrize("engine", ENGINES)
def test_a_loaded_model_does_not_read_its_checkpoint_any_more(engine, sharded, tmp_path):
    """Weights memory-mapped from the checkpoint would make the model die (SIGBUS) at its next
    forward once the file is truncated, and change silently when it is rewritten."""
    child = fork(_forward_after_truncation, str(sharded), engine, report=tmp_path / "child.json")
    status = child.wait()
    assert status == 0, f"exit status {status} ({-signal.SIGBUS} is SIGBUS): {child.result()}"
    assert child.result()["returned"]["same"]
