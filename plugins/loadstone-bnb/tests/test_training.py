"""Adapters on a quantized base: one real training step, gradients only on the adapter, and the
k-bit preparation (fp32 upcast, gradient checkpointing) recorded in the report."""

from __future__ import annotations

import pytest
import torch

import loadstone
from loadstone.testing.conformance import train_one_step
from loadstone.testing import ARCHITECTURES
from loadstone_bnb import measured_bytes


# QLoRA (nf4) on every architecture; fp4 and int8 on one plain decoder, GPT-2 (Conv1D layers) and
# an MoE, which covers their distinct code paths at a third of the time.
LORA_CASES = [(arch, "nf4") for arch in ARCHITECTURES] + [
    (arch, method) for method in ("fp4", "int8") for arch in ("llama", "gpt2", "qwen2_moe")]


@pytest.mark.parametrize(("arch", "method"), LORA_CASES)
def test_lora_on_quantized_base_trains_only_the_adapter(tiny_adapter, input_ids, arch, method):
    result = loadstone.load(str(tiny_adapter(arch)), quantization=method, placement="cpu", progress=False)
    step = train_one_step(result.model, input_ids)
    assert torch.isfinite(torch.tensor(step.loss))
    assert step.trainable and all("lora_" in n for n in step.trainable), step.trainable
    assert step.with_grad == step.trainable
    assert step.changed == step.trainable
    params = result.report.parameters
    assert 0 < params["trainable_percent"] < 10
    assert any("prepare_model_for_kbit_training" in note for note in result.report.training["notes"])


@pytest.fixture(scope="module")
def bf16_checkpoint(tiny_checkpoint):
    return tiny_checkpoint("llama", dtype="bfloat16")


@pytest.mark.parametrize("upcast", [True, False])
def test_upcast_option_controls_the_fp32_cast(bf16_checkpoint, input_ids, upcast):
    result = loadstone.load(str(bf16_checkpoint), quantization="nf4", placement="cpu", progress=False,
                            quantization_options={"upcast": upcast})
    model = result.model
    norm = model.model.norm.weight
    assert norm.dtype == (torch.float32 if upcast else torch.bfloat16)
    assert model.lm_head.weight.dtype == (torch.float32 if upcast else torch.bfloat16)
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.uint8  # packed weights are never cast
    # The estimate follows the cast, so the plan matches the model the load returns.
    real = measured_bytes(model)
    assert abs(result.report.placement["estimated_bytes"] - real) <= 0.05 * real
    notes = " ".join(result.report.training["notes"])
    assert ("cast to float32" in notes) is upcast and ("upcast=False" in notes) is (not upcast)


def test_frozen_load_is_not_prepared(bf16_checkpoint):
    result = loadstone.load(str(bf16_checkpoint), quantization="nf4", placement="cpu", trainable=False,
                            progress=False)
    assert result.model.model.norm.weight.dtype == torch.bfloat16
    real = measured_bytes(result.model)
    assert abs(result.report.placement["estimated_bytes"] - real) <= 0.05 * real


@pytest.mark.parametrize("upcast", [True, False])
def test_gradient_checkpointing_trains_the_adapter(tiny_adapter, input_ids, upcast):
    result = loadstone.load(str(tiny_adapter("llama")), quantization="nf4", placement="cpu", progress=False,
                            gradient_checkpointing=True, quantization_options={"upcast": upcast})
    assert any(getattr(m, "gradient_checkpointing", False) for m in result.model.modules())
    assert "gradient checkpointing enabled (use_reentrant=False)" in result.report.training["notes"]
    step = train_one_step(result.model, input_ids)
    assert step.with_grad == step.trainable and step.trainable
