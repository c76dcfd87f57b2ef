"""bitsandbytes' packed AVX512-BF16 CPU kernel: loadstone decides per layer whether it may run.

Both decisions run on every machine: ``packed_kernel_available`` is forced either way. Where the
CPU really has the kernel, the forwards below exercise it; elsewhere they exercise the generic
kernel, and the layer switches are still checked.
"""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch

import loadstone
from loadstone_bnb import cpu_kernel, measured_bytes


def four_bit_layers(model: torch.nn.Module) -> dict[str, bnb.nn.Linear4bit]:
    return {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


@pytest.fixture(params=[True, False], ids=["cpu-with-packed-kernel", "cpu-without"])
def kernel_available(request, monkeypatch) -> bool:
    monkeypatch.setattr(cpu_kernel, "packed_kernel_available", lambda: request.param)
    return request.param


def test_frozen_load_packs_only_layers_the_kernel_takes(tiny_checkpoint, kernel_available):
    result = loadstone.load(str(tiny_checkpoint("qwen2_moe")), quantization="nf4", placement="cpu",
                            trainable=False, progress=False)
    layers = four_bit_layers(result.model)
    gate = "model.layers.0.mlp.shared_expert_gate"
    assert layers[gate].out_features == 1
    switched_on = {n for n, m in layers.items() if m.support_avx512bf16_for_cpu}
    if kernel_available:
        assert switched_on == {n for n, m in layers.items() if m.out_features % 32 == 0}
        assert gate not in switched_on and "model.layers.0.self_attn.q_proj" in switched_on
        assert any("keep the generic kernel" in n and gate in n for n in result.report.notes)
    else:
        assert not switched_on
    assert "packed" in result.report.quantization["cpu_kernel"] or not kernel_available


def test_trainable_load_never_packs(tiny_checkpoint, kernel_available):
    result = loadstone.load(str(tiny_checkpoint("llama")), quantization="nf4", placement="cpu", progress=False)
    assert not any(m.support_avx512bf16_for_cpu for m in four_bit_layers(result.model).values())
    assert "generic" in result.report.quantization["cpu_kernel"]
    plan = loadstone.plan(str(tiny_checkpoint("llama")), quantization="nf4", placement="cpu")
    assert plan.report.quantization["cpu_kernel"] == result.report.quantization["cpu_kernel"]


def test_int8_and_gpu_plans_say_nothing_about_the_cpu_kernel(tiny_checkpoint):
    plan = loadstone.plan(str(tiny_checkpoint("llama")), quantization="int8", placement="cpu")
    assert "cpu_kernel" not in plan.report.quantization


def test_moe_with_a_one_output_gate_runs_frozen(tiny_checkpoint, input_ids):
    """The first forward after a frozen load crashed in bitsandbytes on AVX512-BF16 CPUs."""
    result = loadstone.load(str(tiny_checkpoint("qwen2_moe")), quantization="nf4", placement="cpu",
                            trainable=False, progress=False)
    with torch.no_grad():
        logits = result.model(input_ids).logits
    assert torch.isfinite(logits).all()


def test_training_survives_a_no_grad_evaluation(tiny_adapter, input_ids):
    """A Trainer evaluation between steps used to repack the layers for good: zero gradients after."""
    model = loadstone.load(str(tiny_adapter("llama")), quantization="nf4", placement="cpu", progress=False).model

    def lora_grad_norm() -> float:
        model.train()
        model.zero_grad()
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        return float(sum(p.grad.norm() for n, p in model.named_parameters() if "lora_A" in n and p.grad is not None))

    before = lora_grad_norm()
    model.eval()
    with torch.no_grad():
        model(input_ids)
    after = lora_grad_norm()
    assert before > 0 and after > 0.5 * before, (before, after)


def test_measured_bytes_do_not_depend_on_a_repack(tiny_checkpoint):
    """bitsandbytes' repack is pure Python up to the kernel call, so it is applied by hand here:
    the measurement must read the same before and after."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    model = loadstone.load(str(tiny_checkpoint("llama")), quantization="nf4", placement="cpu", trainable=False,
                           progress=False).model
    before = measured_bytes(model)
    layer = model.model.layers[0].mlp.up_proj
    layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu(layer.weight.data,
                                                                                 layer.weight.quant_state)
    assert layer.weight.quant_state.packing_format_for_cpu
    assert measured_bytes(model) == before
