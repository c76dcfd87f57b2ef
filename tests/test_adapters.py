"""Adapters: auto-detection, base paths, several adapters, trainability, refusals before any
weight is read, and the task taken from the adapter."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import loadstone
from loadstone import hookimpl
from loadstone.testing import make_lora_adapter


class Stages:
    """Remembers whether weights were loaded and in which stage a load failed."""

    def __init__(self) -> None:
        self.loaded = False
        self.failed_in = None

    @hookimpl
    def loadstone_model_loaded(self):
        self.loaded = True

    @hookimpl
    def loadstone_load_failed(self, stage):
        self.failed_in = stage


def watched() -> tuple[Stages, loadstone.PluginManager]:
    stages = Stages()
    return stages, loadstone.PluginManager(allow=[], extra_plugins=[("stages", stages)])


def _rewrite_config(folder: Path, **changes) -> None:
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.fixture(scope="module")
def lora(llama_lora, sharded_llama) -> Path:
    return llama_lora


@pytest.fixture(scope="module")
def second_lora(sharded_llama, tmp_path_factory) -> Path:
    return make_lora_adapter(sharded_llama, tmp_path_factory.mktemp("lora-b"), r=2,
                             target_modules=["k_proj", "o_proj"], seed=7)


def test_adapter_folder_is_detected_and_loads_as_peft_does(lora, sharded_llama, reference_model, same_weights):
    from peft import PeftModel

    result = loadstone.load(str(lora), placement="cpu", progress=False)
    assert isinstance(result.model, PeftModel)
    report = result.report
    assert report.sources["base"]["path"] == str(sharded_llama.resolve())
    assert report.sources["adapters"][0]["source"]["path"] == str(lora.resolve())
    assert report.decision("base").reason == "adapter_config.json base_model_name_or_path"
    assert report.adapters == [{"name": "default", "peft_type": "LORA", "r": 4, "trainable": True,
                                "active": True, "path": str(lora.resolve()),
                                "base_model_name_or_path": str(sharded_llama.resolve()), "revision": None}]
    expected = PeftModel.from_pretrained(reference_model(sharded_llama), str(lora))
    same_weights(result.model, expected)
    trainable = {n for n, p in result.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def test_relative_base_path_is_taken_from_the_adapter_folder(sharded_llama, tmp_path, monkeypatch):
    base = tmp_path / "models" / "llama"
    shutil.copytree(sharded_llama, base)
    adapter = make_lora_adapter(base, tmp_path / "adapters" / "mine", base_reference="../../models/llama")
    elsewhere = tmp_path / "somewhere" / "else"
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)  # the relative path must not depend on the current directory
    planned = loadstone.plan(str(adapter), placement="cpu")
    assert planned.sources.base.path == base.resolve()


def test_moved_base_is_a_clear_error_and_base_overrides_it(lora, sharded_llama, tmp_path):
    moved = tmp_path / "moved-adapter"
    shutil.copytree(lora, moved)
    _rewrite_config(moved, base_model_name_or_path="/models/that/moved/llama")
    with pytest.raises(loadstone.AdapterError) as info:
        loadstone.plan(str(moved), placement="cpu")
    err = info.value
    assert err.field == "base_model_name_or_path" and "/models/that/moved/llama" in str(err)
    assert "base=" in err.fix and err.file.endswith("adapter_config.json")

    result = loadstone.load(str(moved), base=str(sharded_llama), placement="cpu", progress=False)
    assert result.report.sources["base"]["path"] == str(sharded_llama.resolve())
    assert result.report.decision("base").by == "user"


def test_base_override_needs_an_adapter_reference(sharded_llama, tiny_checkpoint):
    with pytest.raises(loadstone.AdapterError) as info:  # not: silently load the other model
        loadstone.plan(str(sharded_llama), base=str(tiny_checkpoint("qwen2")))
    assert info.value.field == "base" and "not an adapter folder" in str(info.value)


def test_several_adapters_by_name_with_one_active(lora, second_lora, sharded_llama):
    result = loadstone.load(str(sharded_llama), adapters={"first": str(lora), "second": str(second_lora)},
                            active_adapter="second", placement="cpu", progress=False)
    model = result.model
    assert set(model.peft_config) == {"first", "second"} and model.active_adapter == "second"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".second." in n for n in trainable)
    assert any(".first." in n for n, _ in model.named_parameters())  # loaded, frozen
    assert [(a["name"], a["active"], a["trainable"], a["r"]) for a in result.report.adapters] == [
        ("first", False, False, 4), ("second", True, True, 2)]
    # the adapter folder itself as reference, plus an extra one given as "name=path"
    result = loadstone.load(str(lora), adapters=[f"extra={second_lora}"], placement="cpu", progress=False)
    assert set(result.model.peft_config) == {"default", "extra"} and result.model.active_adapter == "default"


def test_unknown_active_adapter_is_refused_before_weights_are_read(lora, second_lora, sharded_llama):
    stages, plugins = watched()
    with pytest.raises(loadstone.AdapterError) as info:
        loadstone.load(str(lora), adapters={"b": str(second_lora)}, active_adapter="c", placement="cpu",
                       progress=False, plugins=plugins)
    assert "'c'" in str(info.value) and "default, b" in str(info.value)
    assert not stages.loaded and stages.failed_in in ("resolve", "inspect", "plan")
    with pytest.raises(loadstone.AdapterError, match="no adapters"):  # not silently ignored
        loadstone.plan(str(sharded_llama), active_adapter="b")


def test_trainable_false_freezes_everything(lora, second_lora, sharded_llama):
    result = loadstone.load(str(lora), adapters={"b": str(second_lora)}, trainable=False, placement="cpu",
                            progress=False)
    assert not any(p.requires_grad for p in result.model.parameters())
    assert not result.model.training
    assert result.report.parameters["trainable"] == 0 and result.report.parameters["trainable_percent"] == 0.0
    assert all(not a["trainable"] for a in result.report.adapters)


def test_wrong_target_module_is_refused_before_weights_are_read(lora, tmp_path):
    broken = tmp_path / "wrong-target"
    shutil.copytree(lora, broken)
    _rewrite_config(broken, target_modules=["q_proj", "qkv_proj"])
    stages, plugins = watched()
    with pytest.raises(loadstone.AdapterError) as info:
        loadstone.load(str(broken), placement="cpu", progress=False, plugins=plugins)
    err = info.value
    assert err.field == "target_modules" and err.found == "qkv_proj" and "LlamaForCausalLM" in str(err)
    assert stages.failed_in == "plan" and not stages.loaded


def test_lora_for_another_model_size_is_refused_before_weights_are_read(lora, tiny_checkpoint):
    wider = tiny_checkpoint("llama", hidden_size=128, intermediate_size=256)
    stages, plugins = watched()
    with pytest.raises(loadstone.AdapterError) as info:
        loadstone.load(str(lora), base=str(wider), placement="cpu", progress=False, plugins=plugins)
    err = info.value
    assert "different model size" in err.fix
    assert "[4, 64]" in str(err.found) and "[r, 128]" in str(err.expected)
    assert stages.failed_in == "plan" and not stages.loaded


@pytest.mark.parametrize("base_task", ["sequence-classification", "causal-lm"])
def test_task_comes_from_the_adapters_task_type(base_task, tiny_checkpoint, tmp_path, reference_model):
    import torch
    from peft import PeftModel

    base = tiny_checkpoint("llama", task=base_task)
    adapter = make_lora_adapter(base, tmp_path / "cls", task_type="SEQ_CLS")
    result = loadstone.load(str(adapter), placement="cpu", progress=False)
    assert type(result.model.get_base_model()).__name__ == "LlamaForSequenceClassification"
    assert result.report.model["task"] == "sequence-classification"
    assert "SEQ_CLS" in result.report.decision("task").reason
    # the classification head comes from the adapter (modules_to_save), so the outputs are peft's own
    expected = PeftModel.from_pretrained(reference_model(base, task="sequence-classification"), str(adapter))
    ids = torch.arange(8).reshape(1, 8) + 1
    with torch.no_grad():
        assert torch.equal(result.model(ids).logits, expected(ids).logits)
