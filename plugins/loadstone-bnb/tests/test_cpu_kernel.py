"""bitsandbytes' packed AVX512-BF16 CPU kernel: off unless a frozen load asks for it, and then
only on the layers it can run.

Both detections run on every machine: ``packed_kernel_available`` is forced either way. Where the
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


def test_frozen_load_asking_for_the_packed_kernel_packs_only_layers_it_takes(tiny_checkpoint, kernel_available):
    result = loadstone.load(str(tiny_checkpoint("qwen2_moe")), quantization="nf4", placement="cpu",
                            trainable=False, progress=False, quantization_options={"cpu_kernel": "packed"})
    layers = four_bit_layers(result.model)
    gate = "model.layers.0.mlp.shared_expert_gate"
    assert layers[gate].out_features == 1
    switched_on = {n for n, m in layers.items() if m.support_avx512bf16_for_cpu}
    if kernel_available:
        assert switched_on == {n for n, m in layers.items() if m.out_features % 32 == 0}
        assert gate not in switched_on and "model.layers.0.self_attn.q_proj" in switched_on
        assert any("keep the generic kernel" in n and gate in n for n in result.report.notes)
        assert result.report.quantization["cpu_kernel"].startswith("packed")
    else:
        assert not switched_on
        assert "no AVX512-BF16" in result.report.quantization["cpu_kernel"]


@pytest.mark.parametrize("trainable", [True, False])
def test_by_default_no_layer_is_ever_packed(tiny_checkpoint, kernel_available, trainable):
    """The generic kernel trains and never changes the weights; packing is an explicit choice."""
    result = loadstone.load(str(tiny_checkpoint("llama")), quantization="nf4", placement="cpu", progress=False,
                            trainable=trainable)
    assert not any(m.support_avx512bf16_for_cpu for m in four_bit_layers(result.model).values())
    assert result.report.quantization["cpu_kernel"].startswith("generic")
    assert ("cpu_kernel='packed' would use" in result.report.quantization["cpu_kernel"]) is kernel_available
    plan = loadstone.plan(str(tiny_checkpoint("llama")), quantization="nf4", placement="cpu", trainable=trainable)
    assert plan.report.quantization["cpu_kernel"] == result.report.quantization["cpu_kernel"]


def test_a_trainable_load_cannot_ask_for_the_packed_kernel(tiny_checkpoint):
    with pytest.raises(loadstone.OptionError) as info:
        loadstone.plan(str(tiny_checkpoint("llama")), quantization="nf4", placement="cpu",
                       quantization_options={"cpu_kernel": "packed"})
    assert info.value.field == "quantization option cpu_kernel" and "no autograd" in info.value.message
    with pytest.raises(loadstone.OptionError):
        loadstone.plan(str(tiny_checkpoint("llama")), quantization="nf4", trainable=False,
                       quantization_options={"cpu_kernel": "fastest"})


def test_int8_and_gpu_plans_say_nothing_about_the_cpu_kernel(tiny_checkpoint):
    plan = loadstone.plan(str(tiny_checkpoint("llama")), quantization="int8", placement="cpu")
    assert "cpu_kernel" not in plan.report.quantization


@pytest.mark.parametrize("cpu_kernel", ["generic", "packed"])
def test_moe_with_a_one_output_gate_runs_frozen(tiny_checkpoint, input_ids, cpu_kernel):
    """The first forward after a frozen load crashed in bitsandbytes on AVX512-BF16 CPUs."""
    result = loadstone.load(str(tiny_checkpoint("qwen2_moe")), quantization="nf4", placement="cpu",
                            trainable=False, progress=False, quantization_options={"cpu_kernel": cpu_kernel})
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
                           progress=False, quantization_options={"cpu_kernel": "packed"}).model
    before = measured_bytes(model)
    layer = model.model.layers[0].mlp.up_proj
    layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu(layer.weight.data,
                                                                                 layer.weight.quant_state)
    assert layer.weight.quant_state.packing_format_for_cpu
    assert measured_bytes(model) == before
