"""Disk offload: the forecast of what a load writes equals what it writes, too little free space
stops the load before anything is written, and a write that fails for real (a file size limit,
a full small filesystem) is a clear error that leaves the folder as it was."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import loadstone
import loadstone_devicemap

# The tiny Mixtral's second layer: its experts are fused while loading, so transformers re-saves
# them into the offload folder (the rest of an offloaded layer is read from the checkpoint).
MIXTRAL_MAP = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.norm": "cpu",
               "model.rotary_emb": "cpu", "lm_head": "cpu"}


def listing(folder: Path) -> dict[str, int]:
    """Every file the load wrote (each load writes inside a folder of its own there)."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def mixtral(tiny_checkpoint):
    return tiny_checkpoint("mixtral")


@pytest.fixture
def probe():
    """``probe(free)``: the free-space probe answers ``free`` bytes for the rest of the test."""
    previous = []

    def install(free: int) -> None:
        previous.append(loadstone_devicemap.set_free_space_probe(lambda folder: free))

    yield install
    if previous:
        loadstone_devicemap.set_free_space_probe(previous[0])


def test_the_forecast_is_what_the_load_writes(mixtral, plugins, tmp_path):
    folder = tmp_path / "offload"
    result = loadstone.load(str(mixtral), placement=MIXTRAL_MAP, offload_folder=str(folder), plugins=plugins,
                            progress=False, trainable=False)
    forecast = result.report.placement["offload"]
    written = listing(folder)
    assert result.report.engine["name"] == "transformers"
    assert forecast["files"] == len(written) > 0
    raw = sum(written.values())
    assert raw <= forecast["write_bytes"] <= raw + len(written) * (4096 + 256)
    assert any(f"into {folder}" in note and f"({len(written)} files)" in note for note in result.report.notes)


def test_a_dense_safetensors_model_writes_nothing(tiny_checkpoint, plugins, tmp_path, probe):
    probe(0)  # a full disk does not matter: nothing is written
    llama = tiny_checkpoint("llama")
    folder = tmp_path / "offload"
    device_map = {"model.embed_tokens": "cpu", "model.layers": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu",
                  "lm_head": "cpu"}
    result = loadstone.load(str(llama), placement=device_map, offload_folder=str(folder), plugins=plugins,
                            progress=False, trainable=False)
    assert result.report.placement["offload"]["files"] == 0
    assert listing(folder) == {}
    assert any("writes nothing" in note for note in result.report.notes)


def test_too_little_space_stops_the_load_before_anything_is_written(mixtral, plugins, tmp_path, probe):
    probe(1000)
    folder = tmp_path / "offload"
    folder.mkdir()
    (folder / "keep.txt").write_text("the user's own file")
    before = listing(folder)
    planned = loadstone.plan(str(mixtral), placement=MIXTRAL_MAP, offload_folder=str(folder), plugins=plugins)
    assert not planned.fits
    assert any("only 1000 B is free" in line and str(folder) in line for line in planned.advice)
    # A lifecycle hook's refusal: the kernel says which plugin refused, keeping the fields.
    with pytest.raises(loadstone.PluginHookError) as info:
        loadstone.load(str(mixtral), placement=MIXTRAL_MAP, offload_folder=str(folder), plugins=plugins,
                       progress=False)
    error = info.value
    assert isinstance(error.__cause__, loadstone.PlacementError) and error.distribution.startswith("loadstone-devicemap")
    assert error.field == "offload_folder" and error.file == str(folder) and "nothing was written" in str(error)
    assert error.found == "1000 B free" and "--offload-folder" in error.fix
    assert listing(folder) == before
    fresh = tmp_path / "not-yet"
    with pytest.raises(loadstone.PluginHookError):
        loadstone.load(str(mixtral), placement=MIXTRAL_MAP, offload_folder=str(fresh), plugins=plugins,
                       progress=False)
    assert not fresh.exists()


@contextlib.contextmanager
def file_size_limit(nbytes: int):
    """Writes past ``nbytes`` into any file fail with EFBIG (a real failed write, as on a full disk)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def test_a_write_that_fails_for_real_is_a_clear_error_and_leaves_nothing(mixtral, plugins, tmp_path):
    folder = tmp_path / "offload"
    folder.mkdir()
    (folder / "keep.txt").write_text("the user's own file")
    before = listing(folder)
    planned = loadstone.plan(str(mixtral), placement=MIXTRAL_MAP, offload_folder=str(folder), plugins=plugins)
    assert planned.fits  # the disk has room: the forecast lets the load start
    with file_size_limit(64 * 1024), pytest.raises(loadstone.PlacementError) as info:
        loadstone.load(str(mixtral), placement=MIXTRAL_MAP, offload_folder=str(folder), plugins=plugins,
                       progress=False)
    error = info.value
    assert "writing offloaded weights into" in str(error) and "File too large" in str(error)
    assert error.field == "offload_folder" and error.fix
    assert listing(folder) == before


SMALL_FS = textwrap.dedent("""
    import json, sys
    import loadstone, loadstone_devicemap
    checkpoint, folder, device_map = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    out = {}
    for claim in (None, 10**12):  # the real probe, then one that claims room so the write itself fails
        if claim:
            loadstone_devicemap.set_free_space_probe(lambda path: claim)
        try:
            loadstone.load(checkpoint, placement=device_map, offload_folder=folder + "/off", progress=False)
            out[str(claim)] = "loaded"
        except loadstone.LoadstoneError as exc:
            import os
            out[str(claim)] = {"message": exc.message, "left": sorted(os.listdir(folder))}
    print(json.dumps(out))
""")


def _can_mount_tmpfs() -> bool:
    if shutil.which("unshare") is None:
        return False
    done = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                          capture_output=True, timeout=30)
    return done.returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs user namespaces to mount a small tmpfs (unshare -rm); "
                                                    "test_a_write_that_fails_for_real... covers real write failures")
def test_a_small_filesystem(mixtral, tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    script = tmp_path / "small_fs.py"
    script.write_text(SMALL_FS)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOADSTONE_")}
    command = (f"mount -t tmpfs -o size=64k tmpfs {mount} && exec {sys.executable} {script} {mixtral} {mount} "
               f"'{json.dumps(MIXTRAL_MAP)}'")
    done = subprocess.run(["unshare", "-rm", "sh", "-c", command], capture_output=True, text=True, timeout=300,
                          env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    forecast, real = out["None"], out[str(10**12)]
    assert "is free there" in forecast["message"] and forecast["left"] == []
    assert "No space left on device" in real["message"] and real["left"] == []
