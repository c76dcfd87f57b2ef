"""Option validation (every bad value is a loadstone.OptionError) and what each option does."""

from __future__ import annotations

import pytest
import torch

import loadstone
from loadstone import QuantizationContext
from loadstone_bnb import OPTION_HELP, BitsAndBytesBackend

backend = BitsAndBytesBackend()


@pytest.mark.parametrize(("method", "options", "field"), [
    ("nf4", {"double_quantization": True}, "quantization options"),      # unknown name
    ("nf4", {"threshold": 4.0}, "quantization option threshold"),         # int8 only
    ("int8", {"compute_dtype": "bfloat16"}, "quantization option compute_dtype"),  # 4-bit only
    ("int8", {"double_quant": True}, "quantization option double_quant"),
    ("fp4", {"compute_dtype": "int8"}, "quantization option compute_dtype"),
    ("nf4", {"quant_storage": "float64"}, "quantization option quant_storage"),
    ("nf4", {"double_quant": "maybe"}, "quantization option double_quant"),
    ("int8", {"threshold": -1}, "quantization option threshold"),
    ("int8", {"threshold": "high"}, "quantization option threshold"),
    ("int8", {"cpu_offload": 2}, "quantization option cpu_offload"),
    ("nf4", {"keep_modules": [1, 2]}, "quantization option keep_modules"),
    ("nf4", {"upcast": None}, "quantization option upcast"),
    ("nf4", {"cpu_quantizer": "fast"}, "quantization option cpu_quantizer"),
    ("int8", {"cpu_quantizer": "chunked"}, "quantization option cpu_quantizer"),  # 4-bit only
])
def test_bad_options_are_option_errors(tiny_checkpoint, method, options, field):
    with pytest.raises(loadstone.OptionError) as info:
        loadstone.plan(str(tiny_checkpoint("llama")), quantization=method, quantization_options=options,
                       placement="cpu")
    assert info.value.field == field
    assert info.value.fix


def test_cli_style_values_are_normalized():
    options = backend.normalize_options("nf4", {"double_quant": "false", "compute_dtype": "bf16",
                                                "quant_storage": "torch.bfloat16", "keep_modules": "mlp.gate, score",
                                                "upcast": "off"})
    assert options == {"double_quant": False, "compute_dtype": "bfloat16", "quant_storage": "bfloat16",
                       "keep_modules": ("mlp.gate", "score"), "upcast": False}
    assert backend.normalize_options("int8", {"threshold": "4.5", "cpu_offload": "yes"}) == {
        "threshold": 4.5, "cpu_offload": True}


def test_every_option_is_documented():
    assert backend.option_help() == OPTION_HELP
    assert all(len(text) > 30 for text in OPTION_HELP.values())


def test_options_reach_bitsandbytes_config():
    ctx = QuantizationContext("nf4", backend.normalize_options("nf4", {
        "compute_dtype": "bfloat16", "double_quant": False, "quant_storage": "bfloat16",
        "keep_modules": ["down_proj"]}), None, None, dtype=torch.float32, device_map={"": "cpu"})
    config = backend.transformers_config(ctx)
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4"
    assert config.bnb_4bit_compute_dtype == torch.bfloat16 and config.bnb_4bit_quant_storage == torch.bfloat16
    assert config.bnb_4bit_use_double_quant is False
    assert config.llm_int8_skip_modules == ["lm_head", "down_proj"]
    int8 = QuantizationContext("int8", backend.normalize_options("int8", {"threshold": 0}), None, None,
                               device_map={"": "cpu"})
    config = backend.transformers_config(int8)
    assert config.load_in_8bit and config.llm_int8_threshold == 0.0 and config.llm_int8_skip_modules == ["lm_head"]


def test_keep_modules_adds_to_lm_head(quantized, input_ids):
    result = quantized("llama", "nf4", quantization_options={"keep_modules": ["down_proj"]})
    kinds = {n: type(m).__name__ for n, m in result.model.named_modules() if n.endswith(("down_proj", "up_proj"))}
    assert all(kind == "Linear" for n, kind in kinds.items() if n.endswith("down_proj"))
    assert all(kind == "Linear4bit" for n, kind in kinds.items() if n.endswith("up_proj"))
    assert type(result.model.lm_head).__name__ == "Linear"


@pytest.mark.parametrize("storage", ["bfloat16", "float32"])
def test_quant_storage_and_compute_dtype_on_the_loaded_layers(quantized, input_ids, storage):
    result = quantized("llama", "nf4", quantization_options={"quant_storage": storage, "compute_dtype": "bfloat16"})
    layer = result.model.model.layers[0].self_attn.q_proj
    assert layer.weight.dtype == getattr(torch, storage)
    assert layer.compute_dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.isfinite(result.model(input_ids).logits).all()


def test_int8_threshold_on_the_loaded_layers(quantized):
    layer = quantized("llama", "int8", quantization_options={"threshold": 4.0}).model.model.layers[0].mlp.up_proj
    assert layer.state.threshold == 4.0
