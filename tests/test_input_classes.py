"""Input classes an audit found refused too late (inside a dependency, blamed on a plugin) or not
at all (a random head, the files another engine would not read): each is now refused or read the
same way at plan time as at load time, by every engine."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import pytest

import loadstone
from loadstone import CheckpointError, OptionError, WeightsMismatchError
from loadstone.contract.units import parse_max_memory


@pytest.mark.parametrize("key", [-1, True, "meta", "xpu:0", "gpu7", 1.5])
def test_max_memory_keys_accelerate_would_not_take_are_refused_by_name(key):
    with pytest.raises(OptionError) as caught:
        parse_max_memory({key: "1GiB"})
    assert caught.value.field == "max_memory" and repr(key) in str(caught.value)


def test_max_memory_and_placement_read_cpu_n_as_the_cpu(tiny_checkpoint):
    assert parse_max_memory({"cpu:0": "1GiB", "cuda:1": "2GiB"}) == {"cpu": 1 << 30, 1: 2 << 30}
    # planned and loaded alike: the load's check compares tensors (on "cpu") with the plan's device
    result = loadstone.load(tiny_checkpoint(), placement="cpu:0", progress=False)
    assert result.report.placement["device_map"] == {"": "cpu"}
    assert {p.device.type for p in result.model.parameters()} == {"cpu"}


@pytest.mark.parametrize("kwargs, field", [
    ({"engine_options": {1: 2}}, "engine_options"),
    ({"quantization": "int8", "quantization_options": {1: 2}}, "quantization_options"),
    ({"quantization": False}, "quantization"),
    ({"adapters": {5: "./adapter"}}, "adapters"),
])
def test_option_names_and_methods_that_are_not_text_are_refused_before_any_plugin_sees_them(kwargs, field,
                                                                                            tiny_checkpoint):
    with pytest.raises(OptionError) as caught:
        loadstone.plan(tiny_checkpoint(), **kwargs)
    assert caught.value.field == field


def _both_layouts(tiny_checkpoint, tmp_path: Path) -> tuple[Path, Path]:
    """A sharded checkpoint with another seed's model.safetensors beside its index."""
    folder = tmp_path / "both"
    shutil.copytree(tiny_checkpoint(max_shard_size="200KB"), folder)
    single = tiny_checkpoint(seed=7)
    shutil.copy(single / "model.safetensors", folder / "model.safetensors")
    return folder, single


@pytest.mark.parametrize("engine", ["loadstone", "transformers"])
def test_beside_an_index_model_safetensors_is_what_every_engine_reads(engine, tiny_checkpoint, tmp_path):
    from safetensors.torch import load_file

    folder, single = _both_layouts(tiny_checkpoint, tmp_path)
    result = loadstone.load(str(folder), engine=engine, progress=False)
    assert [Path(f).name for f in result.report.checkpoint["files"]] == ["model.safetensors"]
    expected = load_file(single / "model.safetensors")
    state = result.model.state_dict()
    for name, tensor in expected.items():
        assert state[name].equal(tensor), name


def test_the_hub_plan_fetches_the_headers_of_the_file_the_load_will_read(tmp_path):
    from loadstone.builtin.hub_headers import snapshot_has_weights, weight_files

    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "s-1.safetensors"}}))
    listing = {"model.safetensors": 10, "s-1.safetensors": 5, "model.safetensors.index.json": 1}
    assert weight_files(tmp_path, listing) == ["model.safetensors"]
    assert weight_files(tmp_path, {"s-1.safetensors": 5}) == ["s-1.safetensors"]
    assert not snapshot_has_weights(tmp_path)  # the shard is not there
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert snapshot_has_weights(tmp_path)


def test_an_index_with_an_empty_weight_map_is_refused_naming_it(tiny_checkpoint, tmp_path):
    folder = tmp_path / "empty-map"
    shutil.copytree(tiny_checkpoint(max_shard_size="200KB"), folder)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {}}))
    with pytest.raises(CheckpointError) as caught:
        loadstone.plan(str(folder), engine="transformers")
    assert caught.value.field == "weight_map" and Path(caught.value.file).name == "model.safetensors.index.json"


def _rewritten(source: Path, folder: Path, tensors: Callable[[dict], dict], config: Callable[[dict], None]) -> Path:
    """A copy of the checkpoint ``source`` whose tensors and config.json the callables change."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, folder)
    save_file(tensors(load_file(folder / "model.safetensors")), str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    data = json.loads((folder / "config.json").read_text())
    config(data)
    (folder / "config.json").write_text(json.dumps(data))
    return folder


def _headless(tiny_checkpoint, tmp_path: Path, architectures: list[str]) -> Path:
    def without_head(tensors: dict) -> dict:
        assert tensors.pop("lm_head.weight", None) is not None, "the tiny Llama stores its head (untied)"
        return tensors

    return _rewritten(tiny_checkpoint(), tmp_path / "headless", without_head,
                      lambda config: config.update(architectures=architectures))


@pytest.mark.parametrize("architectures", [["LlamaModel"], ["LlamaForCausalLm"]])  # headless, or a typo
@pytest.mark.parametrize("engine", ["loadstone", "transformers"])
def test_a_missing_head_is_refused_unless_the_task_was_asked_for(architectures, engine, tiny_checkpoint, tmp_path):
    folder = _headless(tiny_checkpoint, tmp_path, architectures)
    with pytest.raises(WeightsMismatchError, match="no task was asked for") as caught:
        loadstone.load(str(folder), engine=engine, progress=False)
    assert "lm_head.weight" in str(caught.value) and architectures[0] in str(caught.value)
    # asked for, the head is new by intent: initialised, and the report says so
    result = loadstone.load(str(folder), engine=engine, task="causal-lm", progress=False)
    assert any(note.startswith("new task head") for note in result.report.notes)
    assert not result.model.lm_head.weight.is_meta


def test_an_attention_implementation_transformers_refuses_is_the_argument_at_fault(tiny_checkpoint):
    with pytest.raises(OptionError) as caught:
        loadstone.plan(tiny_checkpoint(), attn_implementation="no-such-attention")
    assert caught.value.field == "attn_implementation" and "no-such-attention" in str(caught.value)


def test_a_load_that_does_not_fit_says_its_peaks_in_sizes_and_the_advice_once(tiny_checkpoint):
    from loadstone import PlacementError

    with pytest.raises(PlacementError) as caught:
        loadstone.load(tiny_checkpoint(), max_memory={"cpu": "100KB"}, progress=False)
    error = caught.value
    assert str(error).startswith("the model does not fit the memory budget.")
    assert "KiB" in str(error.found) and "offload" in error.fix
    assert str(error).count("offload_folder=PATH") == 1


@pytest.mark.parametrize("inside", [False, True])
def test_a_reference_to_a_file_says_it_is_a_file_however_it_is_spelled(inside, tiny_checkpoint, monkeypatch):
    from loadstone import ResolutionError

    folder = tiny_checkpoint()
    # "ckpt/model.safetensors" (a Hub id's shape) from beside the folder, or "model.safetensors" from inside it
    monkeypatch.chdir(folder if inside else folder.parent)
    reference = "model.safetensors" if inside else f"{folder.name}/model.safetensors"
    with pytest.raises(ResolutionError, match="is a file, not a model folder"):
        loadstone.plan(reference)


@pytest.mark.parametrize("token", [5, ["hf_secret"], {"token": "hf_secret"}])
def test_a_token_of_another_type_is_refused_without_echoing_it(token, tiny_checkpoint):
    with pytest.raises(OptionError) as caught:
        loadstone.plan(tiny_checkpoint(), token=token)
    assert caught.value.field == "token" and "hf_secret" not in str(caught.value)


def test_an_adapter_naming_modules_it_saved_no_copy_of_says_which_field(tiny_checkpoint, tiny_adapter, tmp_path):
    from loadstone import AdapterError

    adapter = tmp_path / "adapter"
    shutil.copytree(tiny_adapter(), adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["modules_to_save"] = ["lm_head"]
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError) as caught:
        loadstone.plan(str(adapter))
    assert caught.value.field == "modules_to_save" and "lm_head.weight" in str(caught.value)


def test_peft_all_linear_shorthand_is_a_target_not_a_regex(tiny_checkpoint, tiny_adapter, tmp_path):
    # an adapter over every linear layer, its config written with peft's shorthand
    adapter = tmp_path / "all-linear"
    shutil.copytree(tiny_adapter(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                 "down_proj"]), adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["target_modules"] = "all-linear"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    result = loadstone.load(str(adapter), progress=False)
    assert sum("lora_A" in name for name, _ in result.model.named_parameters()) == 7 * 2  # 2 layers


def test_a_float64_checkpoint_under_auto_says_why_it_loads_as_float32(tiny_checkpoint, tmp_path):
    def undeclared(config: dict) -> None:
        config.pop("dtype", None)
        config.pop("torch_dtype", None)

    folder = _rewritten(tiny_checkpoint(), tmp_path / "f64", lambda t: {k: v.double() for k, v in t.items()},
                        undeclared)
    decision = loadstone.plan(str(folder)).report.decision("dtype")
    assert decision.choice == "float32" and "float64" in decision.reason


def test_a_dtype_is_read_like_the_other_names_whitespace_and_case_aside(tiny_checkpoint):
    assert loadstone.plan(tiny_checkpoint(), dtype=" BF16 ").report.decision("dtype").choice == "bfloat16"
