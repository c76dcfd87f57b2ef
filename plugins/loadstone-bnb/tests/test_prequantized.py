"""Pre-quantized bitsandbytes checkpoints: claimed by the backend, loaded as they are (no second
quantization), identical to the model that was saved, and protected against contradicting options."""

from __future__ import annotations

import json

import pytest
import torch

import loadstone
from loadstone_bnb import BitsAndBytesBackend, measured_bytes

METHODS = ("nf4", "fp4", "int8")


@pytest.fixture(scope="module")
def saved(quantized, tmp_path_factory):
    """``saved(method)`` -> (folder, the model that was saved), one per method."""
    cache = {}

    def build(method: str):
        if method not in cache:
            # qwen2_moe has quantized layers, kept lm_head and unquantized 3-D experts side by side.
            source = quantized("qwen2_moe", method)
            folder = tmp_path_factory.mktemp(f"prequantized-{method}")
            source.model.save_pretrained(folder)
            cache[method] = (folder, source.model)
        return cache[method]

    return build


@pytest.mark.parametrize("engine", ["loadstone", "transformers"])
@pytest.mark.parametrize("method", METHODS)
def test_reloads_identically_without_requantizing(saved, input_ids, method, engine):
    folder, original = saved(method)
    qconfig = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert qconfig["quant_method"] == "bitsandbytes"
    result = loadstone.load(str(folder), placement="cpu", trainable=False, progress=False, engine=engine)
    assert result.report.engine["name"] == engine
    decision = result.report.decision("quantization")
    assert decision.choice == method and "pre-quantized" in decision.reason
    assert result.report.quantization["pre_quantized"] is True
    before, after = original.state_dict(), result.model.state_dict()
    assert before.keys() == after.keys()
    different = [k for k in before if not torch.equal(before[k].cpu(), after[k].cpu())]
    assert not different, different[:5]
    with torch.no_grad():
        assert torch.equal(original(input_ids).logits, result.model(input_ids).logits)


@pytest.mark.parametrize("method", METHODS)
def test_plan_estimate_of_a_prequantized_checkpoint(saved, method):
    folder, original = saved(method)
    plan = loadstone.plan(str(folder), placement="cpu", trainable=False)
    real = measured_bytes(original)
    assert abs(plan.report.placement["estimated_bytes"] - real) <= 0.05 * real


@pytest.mark.parametrize(("method", "other"), [("nf4", "int8"), ("int8", "nf4"), ("fp4", "nf4")])
def test_asking_for_another_method_is_a_clear_error(saved, method, other):
    folder, _ = saved(method)
    with pytest.raises(loadstone.QuantizationError) as info:
        loadstone.load(str(folder), quantization=other, placement="cpu")
    error = info.value
    assert error.field == "quantization" and error.found == other and method in error.message
    assert "drop the quantization argument" in error.fix


def test_asking_for_its_own_method_is_fine(saved):
    folder, _ = saved("nf4")
    plan = loadstone.plan(str(folder), quantization="nf4", placement="cpu")
    assert plan.report.decision("quantization").choice == "nf4"


def test_options_cannot_change_a_prequantized_checkpoint(saved):
    folder, _ = saved("nf4")
    with pytest.raises(loadstone.OptionError) as info:
        loadstone.plan(str(folder), quantization_options={"double_quant": False}, placement="cpu")
    assert info.value.field == "quantization option double_quant"
    assert "saved with double_quant=True" in info.value.message
    # Repeating what the checkpoint says, or a training choice, is accepted.
    loadstone.plan(str(folder), placement="cpu", quantization_options={"double_quant": True, "upcast": False,
                                                                       "keep_modules": ["lm_head"]})


def test_lora_trains_on_a_prequantized_base(saved, tiny_adapter, input_ids):
    folder, _ = saved("nf4")
    # The adapter was made on the unquantized base; the quantized one has the same module names.
    result = loadstone.load(str(tiny_adapter("qwen2_moe")), base=str(folder), placement="cpu", progress=False)
    loss = result.model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    with_grad = {n for n, p in result.model.named_parameters() if p.grad is not None}
    assert with_grad and all("lora_" in n for n in with_grad)


@pytest.mark.parametrize(("config", "method"), [
    ({"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}, "nf4"),
    ({"quant_method": "bitsandbytes", "_load_in_4bit": True, "bnb_4bit_quant_type": "fp4"}, "fp4"),
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "fp4"),  # transformers' default quant type
    ({"quant_method": "bitsandbytes", "load_in_8bit": True}, "int8"),
])
def test_checkpoint_method_from_config(config, method):
    backend = BitsAndBytesBackend()
    assert backend.claims_checkpoint(config) and backend.checkpoint_method(config) == method


def test_unknown_quantization_state_is_refused_before_loading(saved, tmp_path):
    """The packed tensors of a pre-quantized checkpoint are checked at plan time: a tensor the
    backend does not take is unexpected, whichever engine would run."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder, _ = saved("nf4")
    damaged = tmp_path / "damaged"
    shutil.copytree(folder, damaged)
    tensors = load_file(damaged / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.weight.mystery"] = torch.zeros(4)
    save_file(tensors, damaged / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(loadstone.WeightsMismatchError) as info:
        loadstone.plan(str(damaged), placement="cpu")
    assert "weight.mystery" in str(info.value) and "unexpected" in str(info.value)


def test_claims_only_bitsandbytes_checkpoints():
    backend = BitsAndBytesBackend()
    assert not backend.claims_checkpoint({"quant_method": "gptq", "bits": 4})
    with pytest.raises(loadstone.ConfigError, match="neither load_in_4bit nor load_in_8bit"):
        backend.checkpoint_method({"quant_method": "bitsandbytes"})
