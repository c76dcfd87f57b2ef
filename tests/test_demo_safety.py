"""``loadstone demo --cache-dir DIR`` never deletes what it did not write: a folder holding other
files, a file, the empty path (the current folder) are refused before anything is built; a folder
the demo built (marker, or the layout of an older version) is reused or rebuilt; and ``--json``
prints nothing but the JSON, even on the first run, when the build imports noisy libraries."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loadstone import OptionError
from loadstone import demo
from loadstone.cli import main


def _refuse_to_build(*args, **kwargs):
    raise AssertionError("the demo started building in a folder it should have refused")


def _fake_old_demo(root: Path, **shape_changes) -> None:
    """The layout an older loadstone's demo left (no marker), without the weights' bytes."""
    (root / "base").mkdir(parents=True)
    (root / "adapter").mkdir()
    (root / "base" / "config.json").write_text(json.dumps({**demo.DEMO_SHAPE, **shape_changes}))
    (root / "base" / "model.safetensors").write_bytes(b"weights")
    (root / "adapter" / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "../base"}))
    (root / "adapter" / "adapter_model.safetensors").write_bytes(b"lora")


def _folder_with_notes(tmp_path: Path) -> tuple[str, Path]:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    return str(tmp_path / "mine"), tmp_path / "mine" / "notes.txt"


def _own_adapter_and_base(tmp_path: Path) -> tuple[str, Path]:
    # The usual layout of a user's own fine-tune: only the model's shape tells it from the demo's.
    _fake_old_demo(tmp_path / "project", hidden_size=4096)
    return str(tmp_path / "project"), tmp_path / "project" / "base" / "model.safetensors"


def _a_file(tmp_path: Path) -> tuple[str, Path]:
    (tmp_path / "data.bin").write_text("keep me")
    return str(tmp_path / "data.bin"), tmp_path / "data.bin"


def _below_a_file(tmp_path: Path) -> tuple[str, Path]:
    (tmp_path / "data.bin").write_text("keep me")
    return str(tmp_path / "data.bin" / "demo"), tmp_path / "data.bin"


def _empty_path(tmp_path: Path) -> tuple[str, Path]:
    (tmp_path / "notes.txt").write_text("keep me")  # the current folder, see the test
    return "", tmp_path / "notes.txt"


CASES = {"folder-with-files": _folder_with_notes, "own-adapter-and-base": _own_adapter_and_base,
         "a-file": _a_file, "below-a-file": _below_a_file, "empty-path": _empty_path}


@pytest.mark.parametrize("rebuild", [False, True], ids=["reuse", "rebuild"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_a_folder_loadstone_did_not_write_is_refused_before_the_build(case, rebuild, tmp_path, monkeypatch, capsys):
    target, kept = CASES[case](tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(demo, "_build", _refuse_to_build)
    code = main(["demo", "--cache-dir", target, "--json", "--no-quantize", *(["--rebuild"] if rebuild else [])])
    out, err = capsys.readouterr()
    assert code == 2, err
    error = json.loads(out)
    assert error["error"] == "OptionError" and error["field"] == "--cache-dir"
    assert (target and target in error["found"]) or (not target and error["found"] == "''")
    assert "empty or new folder" in error["fix"]
    assert kept.read_text() in ("keep me", "weights")
    assert not (tmp_path / demo.MARKER).exists() and not list(tmp_path.rglob(demo.MARKER))


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs a /proc file system")
def test_a_folder_that_cannot_be_created_is_a_typed_error(monkeypatch):
    monkeypatch.setattr(demo, "_build", _refuse_to_build)
    with pytest.raises(OptionError) as info:
        demo.run_demo(cache_dir="/proc/loadstone-demo", quantize=False)
    assert info.value.field == "--cache-dir" and info.value.found == "/proc/loadstone-demo"


def test_new_and_empty_folders_are_claimed_with_the_marker(tmp_path):
    (tmp_path / "empty").mkdir()
    for root in (tmp_path / "new" / "demo", tmp_path / "empty"):
        assert demo.claim_demo_dir(root) == root
        marker = json.loads((root / demo.MARKER).read_text())
        assert marker["written_by"] == "loadstone demo" and marker["demo_version"] == demo.DEMO_VERSION
        (root / "anything").write_text("the demo's")
        assert demo.claim_demo_dir(root) == root  # marked: its contents are the demo's
        assert (root / "anything").exists()


def test_an_older_versions_demo_folder_is_claimed_not_emptied(tmp_path):
    _fake_old_demo(tmp_path / "old")
    demo.claim_demo_dir(tmp_path / "old")
    assert (tmp_path / "old" / demo.MARKER).is_file()
    assert (tmp_path / "old" / "base" / "model.safetensors").read_bytes() == b"weights"


def test_the_default_folder_is_loadstones_whatever_it_holds(tmp_path, monkeypatch):
    import platformdirs

    monkeypatch.delenv("LOADSTONE_DEMO_DIR", raising=False)
    monkeypatch.setattr(platformdirs, "user_cache_dir", lambda app: str(tmp_path / "cache" / app))
    default = tmp_path / "cache" / "loadstone" / f"demo-v{demo.DEMO_VERSION}"
    _fake_old_demo(default)
    (default / "left-by-an-older-version.json").write_text("{}")
    assert demo.claim_demo_dir(None, field="demo folder") == default
    assert (default / demo.MARKER).is_file()
    # the same contents anywhere else are not known to be loadstone's
    _fake_old_demo(tmp_path / "elsewhere")
    (tmp_path / "elsewhere" / "left-by-an-older-version.json").write_text("{}")
    with pytest.raises(OptionError):
        demo.claim_demo_dir(tmp_path / "elsewhere")


def _built(tmp: Path) -> Path:
    (tmp / "base").mkdir(parents=True)
    (tmp / "adapter").mkdir()
    (tmp / "base" / "config.json").write_text("{}")
    (tmp / "adapter" / "adapter_config.json").write_text("{}")
    return tmp


def test_a_rebuild_replaces_the_contents_of_a_marked_folder_only(tmp_path):
    root = demo.claim_demo_dir(tmp_path / "demo")
    (root / "stale.txt").write_text("old build")
    (root / "base").mkdir()
    (root / "base" / "old.safetensors").write_text("old build")
    demo._install(root, _built(root / ".building-x"))
    (root / ".building-x").rmdir()  # emptied by the install (the build's cleanup removes it)
    assert sorted(p.name for p in root.iterdir()) == sorted([demo.MARKER, "adapter", "base"])
    assert sorted(p.name for p in (root / "base").iterdir()) == ["config.json"]
    # a folder whose marker went away meanwhile is left alone
    unmarked = tmp_path / "unmarked"
    unmarked.mkdir()
    (unmarked / "notes.txt").write_text("keep me")
    with pytest.raises(OptionError):
        demo._install(unmarked, _built(tmp_path / "built"))
    assert (unmarked / "notes.txt").read_text() == "keep me"


@pytest.mark.slow
def test_first_run_json_is_the_only_thing_on_stdout(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOADSTONE_")}
    done = subprocess.run([sys.executable, "-m", "loadstone.cli", "demo", "--cache-dir", str(tmp_path / "demo"),
                           "--json", "--no-quantize"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)  # a library's banner before it would make this fail
    assert result["training_step"]["all_gradients_on_adapter"] is True
    assert (tmp_path / "demo" / demo.MARKER).is_file()
