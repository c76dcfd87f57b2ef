"""Disk offload and faults: a load writes only into a folder of its own inside ``offload_folder``
and removes only that when it fails (another load's files and unrelated files in a shared folder
survive), an offload folder inside what the load reads is refused at plan time, and a full disk
is a PlacementError that leaves nothing partial."""

from __future__ import annotations

import errno
import gc
import json
import os
import shutil
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import loadstone
from loadstone import PlacementError, PluginHookError, hookimpl

sys.path.insert(0, str(Path(__file__).parent))  # tests/ is not a package (--import-mode=importlib)
from fault_support import MIXTRAL_DISK_MAP, files_under, logits  # noqa: E402


@pytest.fixture(scope="module")
def mixtral(tiny_checkpoint) -> str:
    return str(tiny_checkpoint("mixtral"))


@pytest.fixture(scope="module")
def reference_logits(mixtral):
    return logits(loadstone.load(mixtral, placement="cpu", progress=False).model)


def _workspaces(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name.startswith("loadstone-offload-"))


def test_a_successful_load_keeps_its_files_while_the_model_lives(mixtral, reference_logits, tmp_path):
    import torch

    offload = tmp_path / "created-by-the-load" / "offload"
    loaded = loadstone.load(mixtral, placement=MIXTRAL_DISK_MAP, offload_folder=str(offload), progress=False)
    (workspace,) = _workspaces(offload)
    assert loaded.report.placement["offload_workspace"] == str(workspace)
    assert sorted(p.name for p in workspace.iterdir()) == [
        "model.layers.1.mlp.experts.down_proj.safetensors", "model.layers.1.mlp.experts.gate_up_proj.safetensors"]
    assert oct(workspace.stat().st_mode & 0o777) == "0o700"  # offloaded weights in /tmp: the owner's only
    torch.testing.assert_close(logits(loaded.model), reference_logits, rtol=0, atol=0)

    del loaded
    gc.collect()
    # Nothing of the load is left once its model is gone, not even the folders it created.
    assert not (tmp_path / "created-by-the-load").exists()


class WaitThenFail:
    """Fails a load after its weights (offloaded ones included) are written, once told to."""

    def __init__(self, shared: Path):
        self.shared, self.loaded, self.go = shared, threading.Event(), threading.Event()

    @hookimpl
    def loadstone_model_loaded(self):
        self.loaded.set()
        assert self.go.wait(120)
        # Another program writes into the shared folder while this load runs.
        (self.shared / "written-meanwhile.txt").write_text("not loadstone's")
        raise RuntimeError("quota service says no")


def test_a_failed_load_removes_only_what_it_wrote(mixtral, reference_logits, tmp_path):
    import torch

    shared = tmp_path / "shared"  # as /tmp is: other loads and other programs write here too
    shared.mkdir()
    (shared / "someone-elses.txt").write_text("kept")
    failing = WaitThenFail(shared)
    plugins = loadstone.PluginManager(extra_plugins=[("quota", failing)])
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(loadstone.load, mixtral, plugins=plugins, placement=MIXTRAL_DISK_MAP,
                            offload_folder=str(shared), progress=False)
        assert failing.loaded.wait(120)
        # A second load offloads into the same folder while the first is still running ...
        before = set(files_under(shared))
        second = loadstone.load(mixtral, placement=MIXTRAL_DISK_MAP, offload_folder=str(shared), progress=False)
        written = set(files_under(shared)) - before
        failing.go.set()
        # ... then the first one fails.
        with pytest.raises(PluginHookError, match="quota service says no"):
            first.result(timeout=120)
    assert (shared / "someone-elses.txt").read_text() == "kept"
    assert (shared / "written-meanwhile.txt").exists(), "the failed load removed another program's file"
    # The second model still reads its offloaded layer from disk.
    torch.testing.assert_close(logits(second.model), reference_logits, rtol=0, atol=0)
    left = set(files_under(shared))
    assert any(name.endswith(".safetensors") for name in written), "each load writes files of its own"
    assert written <= left, f"the failed load removed another load's files: {sorted(written - left)}"
    # What is left of loadstone is the second load's own folder, exactly as it wrote it.
    assert _workspaces(shared) == [Path(second.report.placement["offload_workspace"])]
    assert {name for name in left if name.startswith("loadstone-offload-")} == written


class InterruptAfterOffload:
    """Sends this process a real SIGINT (Ctrl-C) once the weights, offloaded ones included, are written."""

    def __init__(self, offload: Path):
        self.offload, self.written = offload, []

    @hookimpl
    def loadstone_model_loaded(self):
        import signal

        self.written = files_under(self.offload)
        os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.parametrize("folder_exists", [False, True])
def test_an_interrupted_load_leaves_no_partial_files(folder_exists, mixtral, tmp_path):
    offload = tmp_path / "offload"
    if folder_exists:
        offload.mkdir()
        (offload / "notes.txt").write_text("the user's own file")
    interrupt = InterruptAfterOffload(offload)
    plugins = loadstone.PluginManager(extra_plugins=[("ctrl-c", interrupt)])
    with pytest.raises(KeyboardInterrupt):
        loadstone.load(mixtral, plugins=plugins, placement=MIXTRAL_DISK_MAP, offload_folder=str(offload),
                       progress=False)
    assert any(name.endswith(".safetensors") for name in interrupt.written), "the load wrote nothing to interrupt"
    assert files_under(offload) == (["notes.txt"] if folder_exists else [])
    assert offload.exists() == folder_exists


# -- the offload folder must lie outside everything the load reads --------------------------------

def _hub_layout(tmp_path: Path, checkpoint: Path) -> tuple[dict, Path]:
    from loadstone.testing import make_hub_cache

    cache = tmp_path / "hub"
    make_hub_cache(cache, "org/tiny", checkpoint)
    return {"reference": "org/tiny", "cache_dir": str(cache), "offline": True}, cache / "models--org--tiny"


@pytest.mark.parametrize("where", ["the checkpoint", "inside the checkpoint", "a link into the checkpoint",
                                   "inside the adapter", "the hub cache's blobs", "inside the hub snapshot"])
def test_an_offload_folder_among_the_files_the_load_reads_is_refused_at_plan_time(where, tiny_checkpoint,
                                                                                  tiny_adapter, tmp_path):
    checkpoint = Path(shutil.copytree(tiny_checkpoint("llama"), tmp_path / "llama"))
    args: dict = {"reference": str(checkpoint)}
    if where == "the checkpoint":
        offload = checkpoint
    elif where == "inside the checkpoint":
        offload = checkpoint / "offload"
    elif where == "a link into the checkpoint":
        (tmp_path / "link").symlink_to(checkpoint)
        offload = tmp_path / "link" / "offload"
    elif where == "inside the adapter":
        adapter = Path(shutil.copytree(tiny_adapter("llama"), tmp_path / "adapter"))
        args["reference"], offload = str(adapter), adapter / "offload"
    else:
        args, repo = _hub_layout(tmp_path, checkpoint)
        snapshot = next((repo / "snapshots").iterdir())
        offload = repo / "blobs" / "offload" if "blobs" in where else snapshot / "offload"
    watched = offload.parent if offload != checkpoint else checkpoint
    before = files_under(watched)
    reference = args.pop("reference")
    for call in (loadstone.plan, loadstone.load):
        with pytest.raises(PlacementError) as caught:
            call(reference, placement="cpu", offload_folder=str(offload), progress=False, **args)
        error = caught.value
        assert error.field == "offload_folder" and "outside" in error.fix, error
        assert str(offload) in error.message
    assert files_under(watched) == before, "the refused load wrote something"


@pytest.mark.parametrize("offload", ["a-file", "a-file/offload"])
def test_an_offload_folder_that_is_or_lies_below_a_file_is_refused(offload, tiny_checkpoint, tmp_path):
    (tmp_path / "a-file").write_text("a file")
    with pytest.raises(PlacementError) as caught:
        loadstone.plan(str(tiny_checkpoint("llama")), placement="cpu", offload_folder=str(tmp_path / offload))
    assert caught.value.field == "offload_folder" and caught.value.found == "a file"
    assert caught.value.file == str(tmp_path / "a-file")


# -- a full disk ----------------------------------------------------------------------------------

def _partial_then_no_space(real_save_file, how: str):
    """The offload's own write (transformers calls ``save_file`` once per re-saved tensor): the
    first succeeds, the second runs out of space after writing part of its file, as a
    non-atomic writer would leave it."""
    calls = []

    def save_file(tensors, filename, *args, **kwargs):
        calls.append(filename)
        if len(calls) == 1:
            return real_save_file(tensors, filename, *args, **kwargs)
        from safetensors import SafetensorError
        from safetensors.torch import save

        data = save(tensors)
        with open(filename, "wb") as fh:
            fh.write(data[: len(data) // 2])
        if how == "OSError":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
        # what safetensors raises on a full tmpfs (seen with safetensors 0.8)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    return save_file, calls


@pytest.mark.parametrize("how", ["OSError", "SafetensorError"])
def test_no_space_left_during_offload_is_a_placement_error_that_leaves_nothing(how, mixtral, tmp_path,
                                                                               monkeypatch):
    import transformers.integrations.accelerate as offload_writer

    offload = tmp_path / "offload"
    offload.mkdir()
    (offload / "notes.txt").write_text("kept")
    save_file, calls = _partial_then_no_space(offload_writer.save_file, how)
    monkeypatch.setattr(offload_writer, "save_file", save_file)
    with pytest.raises(PlacementError) as caught:
        loadstone.load(mixtral, placement=MIXTRAL_DISK_MAP, offload_folder=str(offload), progress=False)
    assert len(calls) == 2 and Path(calls[1]).exists() is False
    error = caught.value
    assert error.field == "offload_folder" and "filled up" in error.message and "bytes free" in error.found
    assert "No space left on device" in error.message and "bytes placed on 'disk'" in error.expected
    assert files_under(offload) == ["notes.txt"]


_LOAD_ON_TMPFS = """
import json, os, sys
import loadstone
checkpoint, mount, disk_map = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
try:
    # built-ins only: the kernel's own handling of a real write failure, whatever plugins are
    # installed (a placement plugin may refuse the lack of space earlier, at plan time)
    loadstone.load(checkpoint, placement=disk_map, offload_folder=os.path.join(mount, "offload"), progress=False,
                   plugins=loadstone.PluginManager(allow=[]))
    out = {"loaded": True}
except loadstone.LoadstoneError as error:
    out = {"error": type(error).__name__, "field": error.field, "message": error.message}
out["left"] = sorted(os.listdir(mount))
print(json.dumps(out))
"""


def _private_tmpfs(size: str, mount_point: Path) -> list[str] | None:
    """A command prefix that runs its command with a ``size`` tmpfs mounted at ``mount_point``
    in a mount namespace of its own (as root, or as a user where user namespaces are allowed);
    ``None`` where this machine allows neither."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return None
    prefix = [unshare, "--mount"] if os.geteuid() == 0 else [unshare, "--user", "--map-root-user", "--mount"]
    mount = 'mount -t tmpfs -o size="$1" tmpfs "$2" && shift 2 && exec "$@"'
    probe = subprocess.run([*prefix, "sh", "-c", mount, "sh", size, str(mount_point), "true"],
                           capture_output=True, timeout=60)
    return [*prefix, "sh", "-c", mount, "sh", size, str(mount_point)] if probe.returncode == 0 else None


@pytest.mark.slow
@pytest.mark.parametrize("disk,message", [
    ("300k", "No space left on device"),  # room for one of the two offloaded expert tensors (256 and 128 KiB)
    ("300k,ro", "Read-only file system"),
], ids=["full", "read-only"])
def test_a_real_filesystem_that_refuses_the_offload(disk, message, mixtral, tmp_path):
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    prefix = _private_tmpfs(disk, mount_point)
    if prefix is None:
        pytest.skip("this machine allows no tmpfs mount (no root, no user namespaces); "
                    "test_no_space_left_during_offload_... covers the error path")
    done = subprocess.run([*prefix, sys.executable, "-c", _LOAD_ON_TMPFS, mixtral, str(mount_point),
                           json.dumps(MIXTRAL_DISK_MAP)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out.get("error") == "PlacementError", out
    assert out["field"] == "offload_folder" and message in out["message"], out
    assert out["left"] == [], "the failed load left files on that disk"
