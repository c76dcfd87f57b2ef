"""Every method on every tiny architecture: which layers are quantized, how close the logits stay,
and how close ``loadstone plan``'s estimate is to the memory the loaded model really holds."""

from __future__ import annotations

import pytest
import torch

import loadstone
from loadstone.testing import ARCHITECTURES
from loadstone_bnb import measured_bytes
from loadstone_bnb.memory import cpu_quantize_workspace

METHODS = ("nf4", "fp4", "int8")
LAYER = {"nf4": "Linear4bit", "fp4": "Linear4bit", "int8": "Linear8bitLt"}
# Relative L2 error of the logits against the unquantized model, ||q - ref|| / ||ref||. Measured
# on these random tiny models (seed 0): 4-bit 0.04-0.16, int8 <= 0.009. A broken layer (wrong
# transpose, missing scales) gives ~1.0 or more, so the bounds leave room without hiding bugs.
TOLERANCE = {"nf4": 0.25, "fp4": 0.25, "int8": 0.03}
# MoE blocks hold their experts as fused 3-D tensors, which are not nn.Linear: transformers does not
# swap them for bitsandbytes layers, so they stay in the load dtype. Their attention and (Qwen2-MoE)
# shared-expert projections are quantized as usual.
FUSED_EXPERTS = {"mixtral", "qwen2_moe"}

matrix = pytest.mark.parametrize("method", METHODS)
archs = pytest.mark.parametrize("arch", list(ARCHITECTURES))


def linear_layers(model: torch.nn.Module) -> dict[str, str]:
    import bitsandbytes as bnb
    from transformers.pytorch_utils import Conv1D

    kinds = (torch.nn.Linear, Conv1D, bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    return {name: type(m).__name__ for name, m in model.named_modules() if isinstance(m, kinds)}


@archs
@matrix
def test_linear_layers_are_bitsandbytes_except_the_kept_ones(quantized, arch, method):
    model = quantized(arch, method).model
    layers = linear_layers(model)
    kept = {name for name, kind in layers.items() if kind != LAYER[method]}
    assert kept == {"lm_head"}, kept
    assert layers["lm_head"] == "Linear"
    assert sum(kind == LAYER[method] for kind in layers.values()) >= 8
    assert getattr(model, "is_loaded_in_4bit" if method != "int8" else "is_loaded_in_8bit")


@pytest.mark.parametrize("arch", sorted(FUSED_EXPERTS))
@matrix
def test_fused_moe_experts_stay_in_the_load_dtype(quantized, arch, method):
    model = quantized(arch, method).model
    experts = {n: p for n, p in model.named_parameters() if ".experts." in n}
    assert experts and all(p.dim() == 3 and p.dtype == torch.float32 for p in experts.values()), \
        {n: (tuple(p.shape), p.dtype) for n, p in experts.items()}
    routers = [type(m).__name__ for n, m in model.named_modules() if n.endswith("mlp.gate")]
    assert routers and not any(r.startswith("Linear") for r in routers)  # custom router modules, kept as is


@archs
@matrix
def test_logits_stay_close_to_the_unquantized_model(quantized, reference_logits, input_ids, arch, method):
    reference = reference_logits(arch)
    with torch.no_grad():
        logits = quantized(arch, method).model(input_ids).logits
    error = float((logits - reference).norm() / reference.norm())
    assert error < TOLERANCE[method], f"{arch} {method}: relative logits error {error:.4f}"


@archs
@matrix
def test_plan_estimate_matches_the_loaded_model(quantized, tiny_checkpoint, arch, method):
    result = quantized(arch, method)
    plan = loadstone.plan(str(tiny_checkpoint(arch)), quantization=method, placement="cpu", trainable=False)
    estimate = plan.report.placement["estimated_bytes"]
    real = measured_bytes(result.model)
    assert estimate == result.report.placement["estimated_bytes"]
    assert abs(estimate - real) <= 0.05 * real, f"{arch} {method}: plan {estimate} B, loaded {real} B"


@pytest.mark.parametrize("double_quant", [True, False])
def test_double_quant_estimate_and_real_memory(quantized, double_quant):
    result = quantized("llama", "nf4", quantization_options={"double_quant": double_quant})
    weight = result.model.model.layers[0].mlp.up_proj.weight
    assert weight.quant_state.nested is double_quant
    real = measured_bytes(result.model)
    assert abs(result.report.placement["estimated_bytes"] - real) <= 0.05 * real


def test_report_records_backend_and_settings(quantized):
    report = quantized("llama", "nf4").report.to_dict()
    quant = report["quantization"]
    assert quant["distribution"] == "loadstone-bnb" and quant["backend"] == "bitsandbytes"
    assert quant["settings"] == {"method": "nf4", "keep_modules": ["lm_head"], "cpu_offload": False, "upcast": True,
                                 "compute_dtype": "float32", "double_quant": True, "quant_storage": "uint8",
                                 "cpu_kernel": "generic", "cpu_quantizer": "chunked"}
    assert quant["bits_per_quantized_parameter"] == pytest.approx(4.127, abs=1e-3)
    assert report["parameters"]["total"] == sum(p.numel() for p in quantized("llama", "none").model.parameters())


def _quantized_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor a bitsandbytes model holds: packed weights, quantization state and the rest."""
    return {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2_moe"])
def test_native_engine_quantizes_exactly_like_transformers(tiny_checkpoint, arch, method):
    """The native engine quantizes tensor by tensor with bitsandbytes' own parameter types; the
    packed weights and quantization state must equal what transformers + bitsandbytes produce."""
    folder = str(tiny_checkpoint(arch))
    kwargs = dict(quantization=method, placement="cpu", trainable=False, progress=False)
    native = loadstone.load(folder, engine="loadstone", **kwargs)
    reference = loadstone.load(folder, engine="transformers", **kwargs)
    assert native.report.engine["name"] == "loadstone" and reference.report.engine["name"] == "transformers"
    ours, theirs = _quantized_state(native.model), _quantized_state(reference.model)
    assert sorted(ours) == sorted(theirs)
    different = [k for k in ours if ours[k].dtype != theirs[k].dtype or not torch.equal(ours[k], theirs[k])]
    assert not different, different[:5]
    assert getattr(native.model, "is_loaded_in_4bit" if method != "int8" else "is_loaded_in_8bit")
    assert native.model.hf_quantizer.quantization_config.to_dict() == \
        reference.model.hf_quantizer.quantization_config.to_dict()


def test_plan_peak_counts_one_full_precision_tensor_in_flight(tiny_checkpoint):
    folder = str(tiny_checkpoint("llama"))
    plan = loadstone.plan(folder, quantization="nf4", placement="cpu")
    skeleton = plan.build_skeleton()
    largest = max(p.numel() for n, p in skeleton.named_parameters() if n in plan.tensor_map.converted)
    # On the CPU bitsandbytes quantizes with float32 work tensors besides the weight (measured by
    # the conformance kit's peak check, test_conformance.py); on CUDA its kernels need none of that size.
    # the chunked quantizer's work memory is bounded by its piece; bitsandbytes' own op's grows with the weight
    work = cpu_quantize_workspace(largest, "nf4", element_size=4, chunked=True)
    assert plan.peak_bytes_per_device["cpu"] == plan.bytes_per_device["cpu"] + largest * 4 + work
    theirs = loadstone.plan(folder, quantization="nf4", placement="cpu",
                            quantization_options={"cpu_quantizer": "bitsandbytes"})
    work = cpu_quantize_workspace(largest, "nf4", element_size=4)
    assert theirs.peak_bytes_per_device["cpu"] == theirs.bytes_per_device["cpu"] + largest * 4 + work
    assert cpu_quantize_workspace(4096 * 4096, "nf4", element_size=2, chunked=True) < 4096 * 4096 / 2
    gpu = loadstone.plan(folder, quantization="nf4", placement="auto", max_memory={"cuda:0": "80GiB"})
    assert gpu.device_map == {"": 0}
    # plus what the native engine lets the GPU hold besides while readers run ahead (in_flight),
    # which it declares as its own extra bytes
    in_flight = gpu.report.engine.get("extra_bytes", {}).get("cuda:0", 0)
    assert gpu.peak_bytes_per_device["cuda:0"] == gpu.bytes_per_device["cuda:0"] + largest * 4 + in_flight
    unquantized = loadstone.plan(folder, placement="cpu")
    assert unquantized.peak_bytes_per_device == unquantized.bytes_per_device


@pytest.mark.parametrize("method", METHODS)
def test_measured_bytes_do_not_depend_on_a_forward(tiny_checkpoint, input_ids, method):
    """An int8 layer's first forward moves its scales from the weight onto the layer's matmul
    state; the measurement finds them either way (it once lost them: 4 KiB less on tiny Llama)."""
    model = loadstone.load(str(tiny_checkpoint("llama")), quantization=method, placement="cpu", trainable=False,
                           progress=False).model
    before = measured_bytes(model)
    with torch.no_grad():
        model(input_ids)
    assert measured_bytes(model) == before
