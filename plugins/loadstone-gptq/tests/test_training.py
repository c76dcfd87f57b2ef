"""LoRA on a GPTQ base: a training-capable kernel is chosen, one real training step changes only
the adapter, and the base's packed tensors stay as they were."""

from __future__ import annotations

import pytest
import torch

import loadstone
from loadstone.testing.conformance import train_one_step

PACKED_V1_ACT_ORDER = dict(bits=4, group_size=32, desc_act=True, sym=False, v1=True, legacy=True)


@pytest.mark.parametrize("source", ["packed", "gptqmodel"])
@pytest.mark.parametrize("engine", ["loadstone", "transformers"])
def test_lora_trains_only_the_adapter(packed_checkpoint, gptqmodel_checkpoint, tiny_adapter, input_ids, source,
                                      engine):
    from peft.tuners.lora.gptq import GPTQLoraLinear

    base = packed_checkpoint(**PACKED_V1_ACT_ORDER)[0] if source == "packed" else gptqmodel_checkpoint()
    # The adapter was made on the unquantized Llama; the GPTQ base has the same module names.
    result = loadstone.load(str(tiny_adapter("llama")), base=str(base), placement="cpu", progress=False,
                            engine=engine)
    model = result.model
    assert isinstance(model.get_submodule("base_model.model.model.layers.0.self_attn.q_proj"), GPTQLoraLinear)
    kernel = result.report.quantization["kernel"]
    assert (kernel["backend"], kernel["class"]) == ("gptq_torch", "TorchLinear") and "backward" in kernel["reason"]
    step = train_one_step(model, input_ids)
    assert torch.isfinite(torch.tensor(step.loss))
    assert step.trainable and all("lora_" in n for n in step.trainable), step.trainable
    assert step.with_grad == step.trainable == step.changed
    assert not step.frozen_changed, step.frozen_changed  # qweight, qzeros, scales, g_idx untouched
    assert 0 < result.report.parameters["trainable_percent"] < 10
    assert any("does not upcast GPTQ models" in n for n in result.report.training["notes"])


def test_gradient_checkpointing(gptqmodel_checkpoint, tiny_adapter, input_ids):
    result = loadstone.load(str(tiny_adapter("llama")), base=str(gptqmodel_checkpoint()), placement="cpu",
                            progress=False, gradient_checkpointing=True)
    assert "gradient checkpointing enabled (use_reentrant=False)" in result.report.training["notes"]
    step = train_one_step(result.model, input_ids)
    assert step.with_grad == step.trainable and step.trainable


def test_training_kernel_is_exact_too(packed_checkpoint, loaded):
    """The kernel a trainable load gets computes the same model as the inference one."""
    folder, _, _ = packed_checkpoint(**PACKED_V1_ACT_ORDER)
    frozen = loaded(folder)
    trainable = loadstone.load(str(folder), placement="cpu", progress=False)
    ids = torch.arange(12).reshape(1, 12)
    with torch.no_grad():
        assert torch.equal(frozen.model(ids).logits, trainable.model(ids).logits)
