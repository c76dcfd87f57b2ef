"""Placement rules: where bitsandbytes layers may live, offload, rank placement, unsupported devices."""

from __future__ import annotations

import pytest

import loadstone
from loadstone import QuantizationContext
from loadstone_bnb import BitsAndBytesBackend

backend = BitsAndBytesBackend()


def context(method: str = "nf4", **options) -> QuantizationContext:
    return QuantizationContext(method, backend.normalize_options(method, options), None, None)


CPU_AND_DISK = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}


def test_offload_without_permission_is_an_explained_error(tiny_checkpoint, tmp_path):
    with pytest.raises(loadstone.PlacementError) as info:
        loadstone.plan(str(tiny_checkpoint("llama")), quantization="nf4", placement=CPU_AND_DISK,
                       offload_folder=str(tmp_path))
    error = info.value
    assert "model.layers.1" in error.message and "cpu/disk" in error.message
    assert "cpu_offload=True" in error.fix and "placement='cpu'" in error.fix


def test_cpu_offload_without_an_accelerator_would_quantize_nothing(tiny_checkpoint, tmp_path):
    with pytest.raises(loadstone.PlacementError, match="would leave every module unquantized"):
        loadstone.plan(str(tiny_checkpoint("llama")), quantization="int8", placement=CPU_AND_DISK,
                       offload_folder=str(tmp_path), quantization_options={"cpu_offload": True})


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_accelerator_map_with_cpu_entries(method):
    mixed = {"model.layers.1": "cpu", "lm_head": "disk", "": 0}
    with pytest.raises(loadstone.PlacementError) as info:
        backend.check_placement(dict(mixed), context(method))
    assert "lm_head, model.layers.1" in info.value.message
    ctx = context(method, cpu_offload=True)
    assert backend.check_placement(dict(mixed), ctx) == mixed
    ctx.device_map, ctx.dtype = mixed, None
    config = backend.transformers_config(ctx)
    assert config.llm_int8_enable_fp32_cpu_offload is True


@pytest.mark.parametrize("device_map", [{"": "cpu"}, {"": 0}, {"model": 0, "lm_head": 1}])
def test_offload_flag_stays_off_when_nothing_is_offloaded(device_map):
    # transformers leaves every cpu-placed module unquantized when the flag is on, so it is only
    # set for maps that really offload, whatever the option says.
    ctx = context("nf4", cpu_offload=True)
    ctx.device_map = backend.check_placement(dict(device_map), ctx)
    assert backend.transformers_config(ctx).llm_int8_enable_fp32_cpu_offload is False


def test_unsupported_device_is_a_clear_error(tiny_checkpoint):
    # The kernel refuses a map onto 'meta' for every backend (nothing can be loaded there) ...
    with pytest.raises(loadstone.OptionError, match="meta"):
        loadstone.plan(str(tiny_checkpoint("llama")), quantization="fp4", placement={"": "meta"})
    # ... and the backend refuses device kinds bitsandbytes has no kernels for (real bitsandbytes).
    with pytest.raises(loadstone.PlacementError) as info:
        backend.check_placement({"": "meta"}, context("fp4"))
    assert "cannot run fp4 layers on 'meta'" in info.value.message
    assert "cpu" in info.value.expected and "cuda" in info.value.expected


def test_prequantized_checkpoints_cannot_be_offloaded():
    ctx = QuantizationContext("nf4", {}, {"quant_method": "bitsandbytes", "load_in_4bit": True,
                                          "bnb_4bit_quant_type": "nf4"}, None)
    with pytest.raises(loadstone.PlacementError, match="pre-quantized"):
        backend.check_placement({"model": 0, "lm_head": "cpu"}, ctx)


def test_rank_placement_loads_quantized(tiny_checkpoint, monkeypatch):
    # Under torchrun each process loads a full copy on cuda:$LOCAL_RANK; without CUDA, on the CPU.
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    result = loadstone.load(str(tiny_checkpoint("llama")), quantization="nf4", placement="rank",
                            trainable=False, progress=False)
    assert result.report.decision("placement").choice.startswith("rank")
    assert type(result.model.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    assert result.plan.device_map in ({"": "cpu"}, {"": 0})
