"""What cannot be loaded is refused before any weight is read, with an error naming the file, the
field, what was expected and found, and the fix: never a raw traceback from gptqmodel, never
random or wrong weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

import loadstone

BASE = dict(bits=4, group_size=32, desc_act=False, sym=True, v1=True, legacy=False)


@pytest.fixture
def broken(packed_checkpoint, tmp_path):
    """``broken(config=..., drop=..., legacy=...)``: a copy of a packed checkpoint, damaged."""

    def build(*, legacy: bool = False, config: dict | None = None, drop: tuple[str, ...] = (),
              change: dict | None = None) -> Path:
        source, _, _ = packed_checkpoint(**{**BASE, "legacy": legacy})
        folder = tmp_path / "broken"
        shutil.copytree(source, folder)
        name = "quantize_config.json" if legacy else "config.json"
        data = json.loads((folder / name).read_text())
        target = data if legacy else data["quantization_config"]
        target.update(config or {})
        (folder / name).write_text(json.dumps(data))
        if drop or change:
            state = load_file(str(folder / "model.safetensors"))
            for key in drop:
                del state[key]
            state.update(change or {})
            save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return folder

    return build


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("bits", [5, 16, "4"])
def test_unsupported_bits(broken, bits, legacy):
    folder = broken(config={"bits": bits}, legacy=legacy)
    with pytest.raises(loadstone.ConfigError) as info:
        loadstone.plan(str(folder), placement="cpu")
    error = info.value
    assert error.field == "quantization_config.bits" and error.found == repr(bits)
    assert error.expected == "2, 3, 4, 8"
    assert error.file.endswith("quantize_config.json" if legacy else "config.json")
    assert "re-quantize" in error.fix


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("checkpoint_format", "marlin", "gptq, gptq_v2"),
    ("group_size", 0, "a positive integer, or -1 (one group per column)"),
    ("lm_head", True, "false (lm_head not quantized)"),
    ("dynamic", {"-:.*down_proj": {}}, "no per-module overrides"),
    ("sym", "yes", "true or false"),
])
def test_configs_transformers_cannot_load(broken, key, value, expected):
    with pytest.raises(loadstone.ConfigError) as info:
        loadstone.plan(str(broken(config={key: value})), placement="cpu")
    assert info.value.field == f"quantization_config.{key}" and info.value.expected == expected
    assert info.value.fix


def test_auto_gptq_marlin_format_is_refused(broken):
    folder = broken(legacy=True, config={"is_marlin_format": True})
    with pytest.raises(loadstone.ConfigError, match="checkpoint_format='marlin'") as info:
        loadstone.plan(str(folder), placement="cpu")
    assert info.value.file.endswith("quantize_config.json")


LAYER = "model.layers.1.mlp.down_proj"


@pytest.mark.parametrize("engine", ["loadstone", "transformers"])
def test_missing_packed_tensor(broken, engine):
    folder = broken(drop=(f"{LAYER}.qzeros",))
    with pytest.raises(loadstone.LoadstoneError) as info:
        loadstone.load(str(folder), placement="cpu", engine=engine, progress=False)
    error = info.value
    assert f"{LAYER} lacks qzeros" in error.found and error.field.startswith("GPTQ tensors")
    assert error.file.endswith("model.safetensors") and "re-save or re-download" in error.fix


def test_a_quantized_layer_stored_unquantized(broken):
    import torch

    folder = broken(change={f"{LAYER}.weight": torch.zeros(64, 128)})
    with pytest.raises(loadstone.LoadstoneError) as info:
        loadstone.plan(str(folder), placement="cpu")
    assert f"{LAYER} is stored unquantized (as weight), but the config quantizes it" in info.value.found


def test_missing_layer_entirely(broken):
    folder = broken(drop=tuple(f"{LAYER}.{n}" for n in ("qweight", "qzeros", "scales", "g_idx")))
    with pytest.raises(loadstone.WeightsMismatchError, match="missing") as info:
        loadstone.plan(str(folder), placement="cpu")
    assert f"{LAYER}.weight" in info.value.found


@pytest.mark.parametrize("legacy", [False, True])
def test_mismatched_group_size(broken, legacy):
    folder = broken(config={"group_size": 64}, legacy=legacy)  # the tensors were packed with groups of 32
    with pytest.raises(loadstone.LoadstoneError) as info:
        loadstone.plan(str(folder), placement="cpu")
    error = info.value
    name = "quantize_config.json" if legacy else "config.json"
    assert f"packed with group_size 32, but {name} says 64" in error.message
    assert (error.field, error.expected, error.found) == ("quantization_config.group_size", 32, 64)
    assert error.file.endswith(name) and error.fix == f"set group_size to 32 in {name}"


def test_out_of_range_group_index_is_caught_while_loading(broken):
    import torch

    folder = broken(change={f"{LAYER}.g_idx": torch.full((128,), 9, dtype=torch.int32)})
    with pytest.raises(loadstone.WeightsMismatchError, match=r"g_idx holds group numbers 9\.\.9, expected 0\.\.3"):
        loadstone.load(str(folder), placement="cpu", progress=False)


@pytest.mark.parametrize("name", ["auto-gptq", "auto_gptq", "AutoGPTQ"])
def test_auto_gptq_runtime_is_explained(packed_checkpoint, name):
    folder, _, _ = packed_checkpoint(**BASE)
    with pytest.raises(loadstone.QuantizationError) as info:
        loadstone.plan(str(folder), placement="cpu", quantization_options={"backend": name})
    error = info.value
    assert "no_init_weights" in error.message and "gptqmodel reads the same checkpoints" in error.message
    assert error.field == "quantization option backend" and "drop the backend option" in error.fix


def test_a_checkpoint_asking_for_auto_gptq_loads_with_gptqmodel(broken, loaded):
    folder = broken(config={"backend": "auto_gptq"})
    result = loaded(folder)
    assert any("asks for the auto-gptq runtime" in note for note in result.report.notes)
    assert result.report.quantization["kernel"]["class"] == "TorchLinear"


def test_gptq_is_not_a_quantize_on_load_method(tiny_checkpoint):
    with pytest.raises(loadstone.QuantizationError) as info:
        loadstone.plan(str(tiny_checkpoint("llama")), quantization="gptq", placement="cpu")
    assert "loadstone_gptq.quantize" in info.value.fix and "calibration" in info.value.message


@pytest.mark.parametrize("backend", ["gptq_torch_int8", "gptq_marlin", "gptq_exllama_v2", "no_such_kernel"])
def test_training_never_gets_a_kernel_without_backward(packed_checkpoint, backend):
    folder, _, _ = packed_checkpoint(**BASE)
    with pytest.raises(loadstone.OptionError) as info:
        loadstone.load(str(folder), placement="cpu", quantization_options={"backend": backend}, progress=False)
    error = info.value
    assert error.field == "quantization option backend" and error.found == backend
    assert "backward" in error.message or "no kernel" in error.message


def test_unknown_option(packed_checkpoint):
    folder, _, _ = packed_checkpoint(**BASE)
    with pytest.raises(loadstone.OptionError, match="does not take the option"):
        loadstone.plan(str(folder), placement="cpu", quantization_options={"use_exllama": False})


def test_disk_offload_is_refused(packed_checkpoint, tmp_path):
    folder, _, _ = packed_checkpoint(**BASE)
    with pytest.raises(loadstone.PlacementError, match="offloads .* to disk"):
        loadstone.plan(str(folder), placement={"": "disk"}, offload_folder=str(tmp_path))


def test_cpu_next_to_a_gpu_is_refused():
    # A map with a GPU cannot be planned on this CPU-only machine (the placement checks the devices
    # first), so the backend's own check is called directly, as the plan stage calls it.
    from loadstone_gptq import GPTQBackend

    ctx = loadstone.QuantizationContext("gptq", {}, {"quant_method": "gptq", "bits": 4}, None, loading=False)
    with pytest.raises(loadstone.PlacementError) as info:
        GPTQBackend().check_placement({"model": 0, "lm_head": "cpu"}, ctx)
    assert "lm_head on the cpu next to accelerators" in info.value.message
    assert "placement='cpu'" in info.value.fix
    assert GPTQBackend().check_placement({"model": 0, "lm_head": 1}, ctx) == {"model": 0, "lm_head": 1}
