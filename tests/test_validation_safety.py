"""Safety: pickle only on request and only with weights_only; remote code off by default and
reported when on; adapters' auto_mapping never imported; nothing written into checkpoint folders;
the pre-load tensor check passes every valid architecture (tied weights and new heads reported)."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

import loadstone
from loadstone import UnsafeCheckpointError, WeightsMismatchError
from loadstone.testing import ARCHITECTURES

sys.path.insert(0, str(Path(__file__).parent))
import corpus  # noqa: E402


def _pickle_copy(source: Path, dst: Path) -> Path:
    import torch
    from safetensors.torch import load_file

    dst.mkdir()
    shutil.copyfile(source / "config.json", dst / "config.json")
    torch.save(load_file(source / "model.safetensors"), dst / "pytorch_model.bin")
    return dst


def test_malicious_pickle_never_runs(tiny_checkpoint, tmp_path):
    folder = tmp_path / "evil"
    shutil.copytree(tiny_checkpoint("llama"), folder)
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "MARKER"
    corpus.malicious_pickle(folder / "pytorch_model.bin", marker)

    with pytest.raises(UnsafeCheckpointError, match="allow_pickle=True"):
        loadstone.load(str(folder), placement="cpu", progress=False)
    with pytest.raises(UnsafeCheckpointError, match="weights_only=True"):
        loadstone.load(str(folder), placement="cpu", progress=False, allow_pickle=True)
    assert not marker.exists()

    # The payload is live: plain unpickling runs it. This is what weights_only prevented.
    import torch

    torch.load(folder / "pytorch_model.bin", weights_only=False)
    assert marker.exists()


def test_trusted_pickle_loads_with_allow_pickle(tiny_checkpoint, tmp_path, same_weights):
    source = tiny_checkpoint("llama")
    folder = _pickle_copy(source, tmp_path / "pkl")
    with pytest.raises(UnsafeCheckpointError):
        loadstone.plan(str(folder), placement="cpu")
    loaded = loadstone.load(str(folder), placement="cpu", progress=False, allow_pickle=True)
    assert loaded.report.checkpoint["format"] == "pickle"
    reference = loadstone.load(str(source), placement="cpu", progress=False)
    same_weights(loaded.model, reference.model)


def test_pickle_checkpoint_is_checked_against_the_architecture_before_loading(tiny_checkpoint, tmp_path):
    folder = _pickle_copy(tiny_checkpoint("llama"), tmp_path / "pkl")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    with pytest.raises(WeightsMismatchError, match=r"pytorch_model\.bin.*wrong shape"):
        loadstone.plan(str(folder), placement="cpu", allow_pickle=True)


def test_trust_remote_code_is_off_by_default_and_reported_when_on(tiny_checkpoint):
    folder = str(tiny_checkpoint("llama"))
    off = loadstone.plan(folder, placement="cpu")
    assert off.request.trust_remote_code is False
    assert not any(d["topic"] == "remote code" for d in off.report.to_dict()["decisions"])
    on = loadstone.plan(folder, placement="cpu", trust_remote_code=True)
    assert any("trust_remote_code is ON" in note for note in on.report.notes)
    assert any(d["topic"] == "remote code" and d["by"] == "user" for d in on.report.to_dict()["decisions"])
    assert "trust_remote_code is ON" in on.report.render()


def test_adapter_auto_mapping_is_never_imported(tiny_adapter, tmp_path, monkeypatch):
    adapter = tmp_path / "adapter"
    shutil.copytree(tiny_adapter("llama"), adapter)
    marker = tmp_path / "IMPORTED"
    module = "loadstone_evil_auto_mapping"
    # Importable from the adapter folder and from sys.path: whoever imports it leaves the marker.
    for where in (adapter, tmp_path):
        (where / f"{module}.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
                                            f"class EvilModel:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    corpus.edit_json(adapter / "adapter_config.json", lambda c: c.update(
        auto_mapping={"base_model_class": "EvilModel", "parent_library": module}))

    loaded = loadstone.load(str(adapter), placement="cpu", progress=False)
    assert loaded.report.adapters and loaded.report.adapters[0]["name"] == "default"
    assert not marker.exists() and module not in sys.modules


def _snapshot(*folders: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for folder in folders:
        for root, dirs, files in os.walk(folder):
            for name in dirs + files:
                st = os.stat(os.path.join(root, name))
                out[os.path.join(root, name)] = (st.st_mtime_ns, st.st_size)
        out[str(folder)] = (os.stat(folder).st_mtime_ns, 0)
    return out


def test_nothing_is_written_into_checkpoint_folders(tiny_checkpoint, tiny_adapter, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    shutil.copytree(tiny_checkpoint("llama", max_shard_size="200KB"), base)
    shutil.copytree(tiny_adapter("llama"), adapter)
    corpus.edit_json(adapter / "adapter_config.json", lambda c: c.update(base_model_name_or_path=str(base)))
    before = _snapshot(base, adapter)

    loadstone.plan(str(adapter), placement="cpu")
    loadstone.load(str(adapter), placement="cpu", progress=False)
    with pytest.raises(loadstone.AdapterError):  # a failed load touches nothing either
        loadstone.load(str(adapter), placement="cpu", progress=False, adapters={"x": str(base)})
    assert _snapshot(base, adapter) == before


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_valid_checkpoints_pass_the_pre_load_check(arch, tiny_checkpoint):
    """No false alarms: every supported architecture (MoE fusion, tied embeddings) plans cleanly."""
    planned = loadstone.plan(str(tiny_checkpoint(arch)), placement="cpu")
    tied = [n for n in planned.report.notes if n.startswith("tied weights")]
    config = loadstone.testing.make_config(arch)
    assert bool(tied) == bool(config.tie_word_embeddings), planned.report.notes


def test_a_new_task_head_is_reported_not_refused(tiny_checkpoint):
    loaded = loadstone.load(str(tiny_checkpoint("llama")), task="sequence-classification", placement="cpu",
                            progress=False)
    notes = " ".join(loaded.report.notes)
    assert "new task head" in notes and "score.weight" in notes
    assert "lm_head.weight" in notes  # the checkpoint's own head, dropped
