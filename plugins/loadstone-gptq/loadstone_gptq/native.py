"""Loading GPTQ checkpoints through loadstone's native engine, the way ``from_pretrained`` does.

The module swap is transformers' own (its GPTQ ``HfQuantizer.preprocess_model``, which has optimum
replace each layer with the gptqmodel ``QuantLinear`` class chosen for the load). Packed tensors
are not converted: each arrives on its planned device as stored and is copied into the layer's
buffer. Once all are in, the quantizer's ``postprocess_model`` finishes the layers exactly as after
``from_pretrained`` (v1 zero points moved to v2 for kernels that need it, kernel buffers set up,
``config.quantization_config``), so both engines produce the same model, buffer for buffer.
"""

from __future__ import annotations

from typing import Any

from loadstone import QuantizationContext, QuantizationError, WeightsMismatchError, set_module_tensor

from .checks import mismatch_error, tensor_problem
from .kernels import KernelChoice
from .layers import PIECES, quantized
from .settings import GPTQSettings, checkpoint_asks_for_auto_gptq, config_file

# Checkpoint settings a load never needs and transformers' GPTQConfig validates anyway (a custom
# calibration dataset name in an old config would otherwise stop a load that does not calibrate).
_CALIBRATION_ONLY = ("dataset", "tokenizer")


def gptq_config(ctx: QuantizationContext, choice: KernelChoice) -> Any:
    """The ``transformers.GPTQConfig`` of this load: the checkpoint's own, with our kernel."""
    from transformers import GPTQConfig

    data = {k: v for k, v in dict(ctx.checkpoint_config or {}).items() if k not in _CALIBRATION_ONLY}
    data["backend"] = choice.backend
    return GPTQConfig.from_dict(data)


def base_quant_linear() -> type:
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    return BaseQuantLinear


def convert_skeleton(model: Any, ctx: QuantizationContext, choice: KernelChoice) -> None:
    import torch
    from transformers.quantizers.auto import AutoHfQuantizer

    planned = {name for name, module in model.named_modules() if quantized(name, module, ctx.checkpoint_config or {})}
    hf_quantizer = AutoHfQuantizer.from_config(gptq_config(ctx, choice), pre_quantized=True)
    # Under the meta device the new layers allocate nothing (optimum builds them with zeros first).
    with torch.device("meta"):
        hf_quantizer.preprocess_model(model=model, dtype=ctx.dtype, device_map=dict(ctx.device_map or {"": "cpu"}),
                                      checkpoint_files=None, use_kernels=False)
    swapped = {name for name, module in model.named_modules() if isinstance(module, base_quant_linear())}
    if swapped != planned:
        # The plan's estimate and tensor map assumed `planned`; loading another set would be wrong.
        differ = sorted(swapped ^ planned)
        raise QuantizationError(
            f"transformers' GPTQ integration quantizes other layers than loadstone planned for: "
            f"{', '.join(differ[:6])}{' ...' if len(differ) > 6 else ''}.", file=config_file(ctx),
            field="quantization_config.block_name_to_quantize", expected=f"{len(planned)} layers inside the "
            f"numbered decoder blocks", found=f"{len(swapped)} layers",
            fix="set block_name_to_quantize (and modules_in_block_to_quantize) in the checkpoint's "
                "quantization_config to the layers that were quantized, or load with engine='transformers'")
    for name in swapped:
        # TorchLinear answers `.weight` with a shape-and-dtype stand-in; a model initialiser that
        # re-initialises layers by name after loading (GPT-2 scales every c_proj.weight) must
        # leave it alone, as it leaves loaded tensors alone.
        stand_in = getattr(model.get_submodule(name), "_weight_metadata", None)
        if stand_in is not None:
            stand_in._is_hf_initialized = True
    ctx.state["hf_quantizer"] = hf_quantizer
    ctx.state["pieces"] = {name: set() for name in swapped}


def load_tensor(module_name: str, module: Any, name: str, tensor: Any, ctx: QuantizationContext,
                settings: GPTQSettings) -> None:
    if name not in PIECES or not isinstance(module, base_quant_linear()):
        if name == "bias" and isinstance(module, base_quant_linear()):
            # The layer's own bias buffer is float16; from_pretrained casts the stored bias to it.
            tensor = tensor.to(module.bias.dtype)
        set_module_tensor(module, name, tensor)
        return
    problem = tensor_problem(module_name, name, tensor, module, settings)
    if problem:
        raise mismatch_error([problem], settings, config_file(ctx))
    set_module_tensor(module, name, tensor)
    ctx.state["pieces"][module_name].add(name)


def finish(model: Any, ctx: QuantizationContext) -> None:
    """What ``from_pretrained`` does after loading (nothing to do after the transformers engine)."""
    hf_quantizer = ctx.state.get("hf_quantizer")
    if hf_quantizer is None:
        return
    incomplete = {layer: sorted(set(PIECES) - got) for layer, got in ctx.state["pieces"].items() if got != set(PIECES)}
    if incomplete:
        shown = "; ".join(f"{layer} lacks {', '.join(names)}" for layer, names in sorted(incomplete.items())[:6])
        raise WeightsMismatchError(
            f"{len(incomplete)} GPTQ layer(s) are incomplete in the checkpoint.", file=config_file(ctx),
            field="GPTQ tensors (qweight, qzeros, scales, g_idx)", expected="all four tensors of every quantized "
            "layer", found=shown, fix="re-save or re-download the checkpoint; its packed tensors are damaged")
    model.hf_quantizer = hf_quantizer
    hf_quantizer.postprocess_model(model)


def kernel_notes(model: Any, choice: KernelChoice, ctx: QuantizationContext) -> list[str]:
    """Which gptqmodel kernel classes the loaded layers use, and why that kernel was asked for."""
    counts: dict[str, int] = {}
    for module in model.modules():
        if isinstance(module, base_quant_linear()):
            counts[type(module).__name__] = counts.get(type(module).__name__, 0) + 1
    kernels = ", ".join(f"{name} in {n} layers" for name, n in sorted(counts.items())) or "no GPTQ layers"
    notes = [f"gptqmodel kernel: {kernels} (backend {choice.backend!r}: {choice.reason})"]
    if checkpoint_asks_for_auto_gptq(ctx.checkpoint_config or {}):
        asked = (ctx.checkpoint_config or {})["backend"]
        notes.append(f"the checkpoint's config asks for the auto-gptq runtime (backend={asked!r}); auto-gptq is "
                     f"archived and fails to import with transformers 5, so gptqmodel runs it instead")
    return notes
