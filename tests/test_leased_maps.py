"""CPU tensors as copy-on-write views of their checkpoint, kept intact by a file lease: the native
engine's ``reader=mmap``, and ``reader=auto``'s choice where the page cache holds the checkpoint.

A file rewritten or truncated in place under a plain mapping changes the model or kills it with
SIGBUS (tests/test_changed_files.py shows it for ``from_pretrained``); under a lease the writer
waits while the model's bytes are copied out, and the model keeps them."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import loadstone

sys.path.insert(0, str(Path(__file__).parent))  # tests/ is not a package (--import-mode=importlib)
from fault_support import fork, logits  # noqa: E402

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="file leases are Linux's")


@pytest.fixture
def sharded(tiny_checkpoint, tmp_path) -> Path:
    """A private copy of a sharded bf16 checkpoint: these tests rewrite it."""
    return Path(shutil.copytree(tiny_checkpoint("llama", dtype="bfloat16", max_shard_size="200KB"),
                                tmp_path / "llama"))


def _shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def _leases_on(path: Path) -> list[str]:
    """This process's lines of /proc/locks that lease ``path``'s inode."""
    st = os.stat(path)
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    with open("/proc/locks") as fh:
        return [line for line in fh if "LEASE" in line and f" {os.getpid()} " in line and inode in line]


def _inside_file_pages(model, path: Path) -> int:
    """How many of the model's parameters live in pages mapped from ``path``."""
    real, ranges = os.path.realpath(path), []
    with open("/proc/self/maps") as fh:
        for line in fh:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].strip() == real:
                ranges.append(tuple(int(x, 16) for x in parts[0].split("-")))
    return sum(any(lo <= p.data_ptr() < hi for lo, hi in ranges) for p in model.parameters())


def test_auto_maps_cpu_tensors_under_a_lease_where_the_page_cache_holds_them(sharded, same_weights):
    folder = str(sharded)
    for shard in _shards(sharded):
        shard.read_bytes()  # in the page cache
    result = loadstone.load(folder, placement="cpu", progress=False)
    options = result.report.engine["options"]
    assert options["reader"] == "mmap" and options["unleased"] == "read", options
    assert any("reader=auto chose mmap for the CPU: the page cache holds the checkpoint" in n
               for n in result.report.notes), result.report.notes
    note = next(n for n in result.report.notes if "copy-on-write views" in n)
    shards = len(_shards(sharded))
    assert shards >= 2 and f"{shards} of {shards} files under a read lease" in note, note
    assert sum(_inside_file_pages(result.model, shard) for shard in _shards(sharded)) == len(
        list(result.model.parameters()))
    assert all(len(_leases_on(shard)) == 1 for shard in _shards(sharded))
    copied = loadstone.load(folder, placement="cpu", engine_options={"reader": "pread"}, progress=False)
    same_weights(result.model, copied.model)
    assert sum(_inside_file_pages(copied.model, shard) for shard in _shards(sharded)) == 0


def test_the_leases_end_with_the_model(sharded):
    import gc

    result = loadstone.load(str(sharded), placement="cpu", engine_options={"reader": "mmap"}, progress=False)
    assert all(_leases_on(shard) for shard in _shards(sharded))
    del result
    gc.collect()
    assert not any(_leases_on(shard) for shard in _shards(sharded))


def _rewrite_while_loaded(folder: str, how: str) -> dict:
    import torch

    from loadstone.engines import leases

    seen = len(leases.breaks_seen())  # breaks of earlier tests in this process are not this one's
    loaded = loadstone.load(folder, placement="cpu", progress=False)
    before = logits(loaded.model)
    weight = loaded.model.get_parameter("model.layers.1.mlp.down_proj.weight")
    original = weight.detach().clone()
    with torch.no_grad():
        weight.add_(1.0)  # a write of the process's own: a copy-on-write page, which a break must keep
    changed = weight.detach().clone()
    shards = _shards(Path(folder))
    file_bytes = sum(os.path.getsize(p) for p in shards)
    if how == "truncated by another process":
        code = "import os, sys\nfor p in sys.argv[1:]:\n    os.truncate(p, 100)"
        subprocess.run([sys.executable, "-c", code, *map(str, shards)], check=True, timeout=30)
    elif how == "copied over in this process":  # cp, shutil.copyfile: the same inode, truncated, then written
        other = Path(folder).parent / "other.bin"
        other.write_bytes(os.urandom(os.path.getsize(shards[0])))
        for shard in shards:
            shutil.copyfile(other, shard)
    elif how == "rewritten in place by another process":
        code = "import sys\nfor p in sys.argv[1:]:\n    f = open(p, 'r+b'); f.seek(-4096, 2); f.write(bytes(4096)); f.close()"
        subprocess.run([sys.executable, "-c", code, *map(str, shards)], check=True, timeout=30)
    broken = leases.breaks_seen()[seen:]
    after = logits(loaded.model)
    kept_own_write = bool(torch.equal(weight, changed))
    with torch.no_grad():
        weight.copy_(original)
    return {"broken": sorted(b.path.name for b in broken), "errors": [b.error for b in broken if b.error],
            "copied": sum(b.copied for b in broken), "kept_own_write": kept_own_write,
            "same_logits_after_undo": bool(torch.equal(logits(loaded.model), before)),
            "changed_logits_before_undo": not bool(torch.equal(after, before)),
            "file_bytes": file_bytes, "mapped_bytes": sum(p.numel() * p.element_size() for p in loaded.model.parameters())}


@pytest.mark.parametrize("how", ["truncated by another process", "copied over in this process",
                                 "rewritten in place by another process"])
def test_a_file_rewritten_under_a_loaded_model_waits_and_the_model_keeps_its_weights(sharded, tmp_path, how):
    # In a child: without the lease a truncation would kill it (SIGBUS), and only it.
    child = fork(_rewrite_while_loaded, str(sharded), how, report=tmp_path / "child.json")
    status = child.wait()
    assert status == 0, f"exit status {status} ({-signal.SIGBUS} is SIGBUS): {child.result()}"
    outcome = child.result()["returned"]
    assert outcome["broken"] == sorted(p.name for p in _shards(sharded)), outcome
    assert not outcome["errors"] and outcome["kept_own_write"] and outcome["same_logits_after_undo"], outcome
    assert outcome["changed_logits_before_undo"], outcome  # the +1.0 was really in the model
    # the bytes tensors use, rounded out to pages; no more than the files hold
    assert outcome["mapped_bytes"] <= outcome["copied"] <= outcome["file_bytes"], outcome


def test_a_file_open_for_writing_elsewhere_is_read_or_mapped_unprotected_as_asked(sharded, same_weights):
    folder = str(sharded)
    victim = _shards(sharded)[1]
    with open(victim, "r+b"):  # no read lease can be had while anyone may write
        auto = loadstone.load(folder, placement="cpu", progress=False)
        mapped = loadstone.load(folder, placement="cpu", engine_options={"reader": "mmap"}, progress=False)
        careful = loadstone.load(folder, placement="cpu", engine_options={"reader": "mmap", "unleased": "read"},
                                 progress=False)
    why = "no lease (the file is open for writing (or memory-mapped writable) elsewhere)"
    for result in (auto, careful):
        assert any(f"{victim.name} was read, not mapped: {why}" in n for n in result.report.notes), result.report.notes
        assert _inside_file_pages(result.model, victim) == 0
        shards = len(_shards(sharded))
        assert any(f"{shards - 1} of {shards} files under a read lease" in n for n in result.report.notes)
    assert any(f"{victim.name} is mapped with no lease (the file is open for writing" in n
               for n in mapped.report.notes), mapped.report.notes
    assert _inside_file_pages(mapped.model, victim) > 0 and not _leases_on(victim)
    same_weights(auto.model, mapped.model)
    same_weights(auto.model, careful.model)


def test_a_file_too_big_to_copy_within_the_lease_break_time_is_not_leased(sharded, monkeypatch):
    from loadstone.engines import leases

    monkeypatch.setattr(leases, "MIN_COPY_BYTES_PER_S", 1)  # 45 bytes in the kernel's 45 s
    result = loadstone.load(str(sharded), placement="cpu", progress=False)
    assert all(_inside_file_pages(result.model, shard) == 0 for shard in _shards(sharded))
    assert any("could not be copied out within the kernel's lease-break time" in n for n in result.report.notes)


def test_auto_reads_a_checkpoint_out_of_the_page_cache(tiny_checkpoint, disk_folder):
    folder = Path(shutil.copytree(tiny_checkpoint("llama", dtype="bfloat16"), disk_folder / "llama"))
    os.sync()  # dirty pages cannot be dropped
    for shard in _shards(folder):
        fd = os.open(shard, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    plan = loadstone.plan(str(folder), placement="cpu")
    assert plan.engine_options["reader"] == "pread" and "unleased" not in plan.engine_options
    assert any("reader=auto chose pread for the CPU: less than half of the checkpoint is in the page cache" in n
               for n in plan.report.notes), plan.report.notes


def test_auto_reads_where_the_platform_has_no_leases(sharded, monkeypatch):
    from loadstone.engines import leases

    monkeypatch.setattr(leases, "leases_supported", lambda: False)
    result = loadstone.load(str(sharded), placement="cpu", progress=False)
    assert result.report.engine["options"]["reader"] == "pread"
    assert any("reader=auto chose pread for the CPU: this platform has no file leases" in n
               for n in result.report.notes)
    assert all(_inside_file_pages(result.model, shard) == 0 for shard in _shards(sharded))


@pytest.mark.parametrize("options,field", [
    ({"unleased": "copy"}, "engine option unleased"),
    ({"unleased": ["read"]}, "engine option unleased"),
    ({"unleased": None}, "engine option unleased"),
    ({"reader": "pread", "unleased": "read"}, "engine option unleased"),
])
def test_bad_unleased_options_are_refused_at_plan_time(sharded, options, field):
    with pytest.raises(loadstone.OptionError) as caught:
        loadstone.plan(str(sharded), placement="cpu", engine_options=options)
    assert caught.value.field == field and caught.value.fix


def test_a_model_on_a_gpu_plan_maps_nothing(sharded):
    """Mapping is for tensors kept on the CPU: a plan that places none there settles as before."""
    from loadstone.engines.native import NativeEngine

    plan = loadstone.plan(str(sharded), placement="cpu", engine_options={"reader": "pread"})
    plan.device_map = {"": 0}  # what a plan onto cuda:0 holds; CI has no GPU to plan one for real
    plan.engine_options = {"unleased": "read"}  # asked for, beside reader=auto: nothing to say on a GPU
    NativeEngine().extra_bytes(plan)
    # instanttensor where installed (a GPU machine), else pread: never mmap
    assert plan.engine_options["reader"] in ("pread", "instanttensor") and "unleased" not in plan.engine_options


def _truncate_during_the_load(folder: str) -> dict:
    """The shard being mapped truncated by another process once the engine has mapped its first
    tensor: the writer waits while the watcher copies the whole file out (the load still maps
    from it, so no later view reads past the file's end), and the load is refused at its end as
    any load of a file changed under it is."""
    from loadstone.engines import leases
    from loadstone.engines.reader import SafetensorsReader

    original, calls, victim = SafetensorsReader.map, [], []
    seen = len(leases.breaks_seen())  # breaks of earlier tests in this process are not this one's

    def map_then_truncate(self, info, **kwargs):
        tensor = original(self, info, **kwargs)
        calls.append(info.name)
        if len(calls) == 1:
            victim.append(info.file)
            code = "import os, sys\nos.truncate(sys.argv[1], 0)"
            subprocess.run([sys.executable, "-c", code, str(info.file)], check=True, timeout=30)
        return tensor

    SafetensorsReader.map = map_then_truncate
    try:
        loadstone.load(folder, placement="cpu", progress=False)
        raised = None
    except loadstone.CheckpointError as error:
        raised = {"file": error.file, "message": error.message}
    finally:
        SafetensorsReader.map = original
    return {"mapped": len(calls), "victim": str(victim[0]), "size": os.path.getsize(victim[0]), "raised": raised,
            "copied": [b.copied for b in leases.breaks_seen()[seen:]],
            "errors": [b.error for b in leases.breaks_seen()[seen:]]}


def test_a_file_truncated_during_the_load_is_copied_out_then_refused(sharded, tmp_path):
    sizes = {str(p): os.path.getsize(p) for p in _shards(sharded)}
    child = fork(_truncate_during_the_load, str(sharded), report=tmp_path / "child.json")
    status = child.wait()
    assert status == 0, f"exit status {status} ({-signal.SIGBUS} is SIGBUS): {child.result()}"
    outcome = child.result()["returned"]
    assert outcome["size"] == 0 and outcome["mapped"] > 2 and not any(outcome["errors"]), outcome
    assert outcome["copied"] == [sizes[outcome["victim"]]], outcome  # the whole file: the load still ran
    assert outcome["raised"]["file"] == outcome["victim"], outcome
    assert "changed during the load" in outcome["raised"]["message"], outcome


def test_a_forked_child_that_frees_the_model_leaves_the_parent_its_leases(sharded):
    """A DataLoader worker made by fork() inherits the lease's file description: its copy of the
    model being freed must not end the parent's leases."""
    import gc

    result = loadstone.load(str(sharded), placement="cpu", engine_options={"reader": "mmap"}, progress=False)
    assert all(_leases_on(shard) for shard in _shards(sharded))
    pid = os.fork()
    if pid == 0:  # the child frees its copy, runs the finalizers, and leaves
        code = 0
        try:
            del result
            gc.collect()
        except BaseException:  # noqa: BLE001
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert all(_leases_on(shard) for shard in _shards(sharded))
    del result
    gc.collect()
    assert not any(_leases_on(shard) for shard in _shards(sharded))


def _watchers() -> list:
    import threading

    return [t for t in threading.enumerate() if t.name == "loadstone-leases"]


def _wait_for(condition, seconds: float = 5.0) -> bool:
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def _watcher_lifecycle(folder: str, scratch: str) -> dict:
    """No thread is left behind once the models that needed it are gone (a later fork() would
    warn of it); the next leased load starts a new one, which answers breaks as the first did.
    Run in a forked child: models of earlier tests in this process would keep a watcher alive."""
    import gc

    import torch

    from loadstone.engines import leases

    shards, steps = _shards(Path(folder)), {}
    result = loadstone.load(folder, placement="cpu", engine_options={"reader": "mmap"}, progress=False)
    steps["while loaded"] = len(_watchers())
    del result
    gc.collect()
    steps["ended once freed"] = _wait_for(lambda: not _watchers())
    with open(shards[0], "r+b"):  # refused for this shard; the others are leased
        refused = loadstone.load(folder, placement="cpu", engine_options={"reader": "mmap", "unleased": "read"},
                                 progress=False)
    steps["with a refused lease"] = len(_watchers())
    del refused
    gc.collect()
    steps["ended again"] = _wait_for(lambda: not _watchers())
    again = loadstone.load(folder, placement="cpu", progress=False)
    seen = len(leases.breaks_seen())
    other = Path(scratch) / "other.bin"
    other.write_bytes(os.urandom(os.path.getsize(shards[0])))
    before = logits(again.model)
    for shard in shards:
        shutil.copyfile(other, shard)
    steps["breaks answered"] = len(leases.breaks_seen()) - seen
    steps["same logits"] = bool(torch.equal(logits(again.model), before))
    del again
    gc.collect()
    steps["ended at last"] = _wait_for(lambda: not _watchers())
    return steps


def test_the_watcher_thread_lives_only_while_a_lease_does(sharded, tmp_path):
    child = fork(_watcher_lifecycle, str(sharded), str(tmp_path), report=tmp_path / "child.json")
    status = child.wait()
    assert status == 0, child.result()
    assert child.result()["returned"] == {
        "while loaded": 1, "ended once freed": True, "with a refused lease": 1, "ended again": True,
        "breaks answered": len(_shards(sharded)), "same logits": True, "ended at last": True}, child.result()
