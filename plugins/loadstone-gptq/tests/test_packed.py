"""GPTQ checkpoints packed here from known integer codes (gptq_reference.py), in both zero-point
conventions, with and without act-order, described by a modern config.json or only by an
auto-gptq quantize_config.json: every layer dequantizes to the known weight, and the model's logits
equal those of the same model stored unquantized."""

from __future__ import annotations

import json

import pytest
import torch

import loadstone
from gptq_support import layer_weight

CASES = {
    "v1-4bit-sym-modern": dict(bits=4, group_size=32, desc_act=False, sym=True, v1=True, legacy=False),
    "v1-4bit-actorder-asym-legacy": dict(bits=4, group_size=32, desc_act=True, sym=False, v1=True, legacy=True),
    "v2-4bit-actorder-asym-modern": dict(bits=4, group_size=64, desc_act=True, sym=False, v1=False, legacy=False),
    "v2-4bit-sym-legacy": dict(bits=4, group_size=32, desc_act=False, sym=True, v1=False, legacy=True),
    "v1-8bit-column-asym": dict(bits=8, group_size=-1, desc_act=False, sym=False, v1=True, legacy=False),
    "v2-2bit-actorder-sym": dict(bits=2, group_size=32, desc_act=True, sym=True, v1=False, legacy=False),
    "v1-3bit-asym-legacy": dict(bits=3, group_size=32, desc_act=False, sym=False, v1=True, legacy=True),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_weights_and_logits_match_the_reference(packed_checkpoint, loaded, input_ids, case):
    folder, weights, twin = packed_checkpoint(**CASES[case])
    result = loaded(folder)
    assert result.report.decision("quantization").choice == "gptq"
    settings = result.report.quantization["settings"]
    assert (settings["bits"], settings["desc_act"], settings["sym"]) == tuple(CASES[case][k] for k in
                                                                              ("bits", "desc_act", "sym"))
    assert settings["checkpoint_format"] == ("gptq" if CASES[case]["v1"] else "gptq_v2")
    assert settings["source"] == ("quantize_config.json" if CASES[case]["legacy"] else "config.json")
    model = result.model
    for layer, exact in weights.items():
        got = layer_weight(model.get_submodule(layer))
        # The kernel dequantizes in float16: the exact weight, rounded to float16 once, nothing else.
        assert torch.equal(got, exact.half().float()), layer
        assert (got - exact).abs().max() <= exact.abs().max() * 2 ** -11
    reference = loaded(twin).model
    with torch.no_grad():
        a, b = model(input_ids).logits, reference(input_ids).logits
    # Same weights, same float32 activations: only the matmul's summation order may differ.
    assert torch.allclose(a, b, rtol=0, atol=1e-5), (a - b).abs().max()


def test_legacy_checkpoint_writes_its_config_for_both_engines(packed_checkpoint, loaded):
    folder, weights, _ = packed_checkpoint(**CASES["v1-4bit-actorder-asym-legacy"])
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    native = loaded(folder, engine="loadstone")
    via_transformers = loaded(folder, engine="transformers")
    assert native.report.engine["name"] == "loadstone" and via_transformers.report.engine["name"] == "transformers"
    reason = native.report.decision("quantization").reason
    assert "read it from the checkpoint's own files" in reason
    a, b = native.model.state_dict(), via_transformers.model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:4]
    assert native.model.config.quantization_config.desc_act is True


def test_native_engine_is_chosen_and_reported(packed_checkpoint, loaded):
    folder, _, _ = packed_checkpoint(**CASES["v2-4bit-actorder-asym-modern"])
    report = loaded(folder).report
    assert report.decision("engine").choice == "loadstone"
    assert not {"loadstone", "transformers"} & set(report.engine["not_able"])  # a plugin's engine may decline
    kernel = report.quantization["kernel"]
    assert (kernel["backend"], kernel["class"]) == ("gptq_torch", "TorchLinear")
    assert "exactly" in kernel["reason"]
    assert any(n.startswith("gptqmodel kernel: TorchLinear in 14 layers") for n in report.notes)


@pytest.mark.parametrize("case", ["v1-4bit-sym-modern", "v2-2bit-actorder-sym", "v1-8bit-column-asym"])
def test_plan_estimate_matches_the_loaded_bytes(packed_checkpoint, loaded, case):
    from loadstone_gptq import measured_bytes

    folder, _, _ = packed_checkpoint(**CASES[case])
    real = measured_bytes(loaded(folder).model)
    planned = loadstone.plan(str(folder), placement="cpu", trainable=False).report.placement["estimated_bytes"]
    assert abs(planned - real) <= 0.05 * real, (planned, real)


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_biases_and_conv1d_layers(packed_checkpoint, loaded, tiny_adapter, input_ids, arch):
    """Qwen2's q/k/v projections carry a bias (kept in float16 by the GPTQ layer, as from_pretrained
    keeps it); GPT-2's layers are Conv1D, stored [in, out], and its initialiser re-scales every
    c_proj.weight after loading."""
    folder, weights, twin = packed_checkpoint(arch, **CASES["v1-4bit-actorder-asym-legacy"])
    model = loaded(folder).model
    for layer, exact in weights.items():
        assert torch.equal(layer_weight(model.get_submodule(layer)), exact.half().float()), layer
    with torch.no_grad():
        a, b = model(input_ids).logits, loaded(twin).model(input_ids).logits
    assert torch.allclose(a, b, rtol=0, atol=1e-5), (a - b).abs().max()
    trained = loadstone.load(str(tiny_adapter(arch)), base=str(folder), placement="cpu", progress=False).model
    trained(input_ids=input_ids, labels=input_ids).loss.backward()
    with_grad = {n for n, p in trained.named_parameters() if p.grad is not None}
    assert with_grad and all("lora_" in n for n in with_grad)
