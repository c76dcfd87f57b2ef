"""Loading through loadstone's native engine: the same modules, packed weights and quantization
state transformers + bitsandbytes produce, built tensor by tensor on the device.

The module swap is transformers' own (its bitsandbytes ``HfQuantizer.preprocess_model``, which
calls ``replace_with_bnb_linear``), and each weight is quantized by bitsandbytes' own parameter
types exactly as transformers' conversion ops do it (``Params4bit(...).to(device)`` runs
``quantize_4bit`` on that device; ``Int8Params(...).to(device)`` runs the int8 row-wise
quantization), so a natively loaded model equals one from ``from_pretrained`` bit for bit.
Pre-quantized checkpoints arrive as their packed weight plus its state tensors; a layer is built
(``Params4bit.from_prequantized``, ``Int8Params`` with its ``SCB``) once its last piece arrives.
"""

from __future__ import annotations

import contextlib
from typing import Any

from loadstone import QuantizationContext, set_module_tensor

from .options import CHUNKED, BnbSettings

# Checkpoint tensor names of a pre-quantized int8 layer besides its "weight" (transformers'
# serialized_names for the 8-bit quantizer).
INT8_STATE = ("SCB", "weight_format")


def state_names(settings: BnbSettings) -> tuple[str, ...]:
    """The checkpoint tensors a pre-quantized layer stores besides ``weight``."""
    if not settings.four_bit:
        return INT8_STATE
    nested = ("weight.nested_absmax", "weight.nested_quant_map") if settings.double_quant else ()
    return ("weight.absmax", "weight.quant_map", *nested, f"weight.quant_state.bitsandbytes__{settings.method}")


def quantizer(transformers_config: Any, ctx: QuantizationContext) -> Any:
    """transformers' bitsandbytes quantizer for this load (the one ``from_pretrained`` would build)."""
    from transformers.quantizers.auto import AutoHfQuantizer

    return AutoHfQuantizer.from_config(transformers_config, pre_quantized=ctx.pre_quantized)


def convert_skeleton(model: Any, transformers_config: Any, ctx: QuantizationContext) -> None:
    hf_quantizer = quantizer(transformers_config, ctx)
    hf_quantizer.preprocess_model(model=model, dtype=ctx.dtype, device_map=ctx.device_map, checkpoint_files=None,
                                  use_kernels=False)
    ctx.state["hf_quantizer"] = hf_quantizer


def load_tensor(module_name: str, module: Any, name: str, tensor: Any, ctx: QuantizationContext,
                settings: BnbSettings) -> None:
    import bitsandbytes as bnb

    four_bit = isinstance(module, bnb.nn.Linear4bit)
    if not (four_bit or isinstance(module, bnb.nn.Linear8bitLt)) or name == "bias":
        set_module_tensor(module, name, tensor)
        return
    if not ctx.pre_quantized:
        _quantize(module, tensor, four_bit, cpu_quantizer(ctx, settings) if four_bit else None)
        return
    if name == "weight_format":  # LLM.int8's saved layout marker; only the row-major layout exists now
        return
    pieces = ctx.state.setdefault("pieces", {}).setdefault(module_name, {})
    pieces[name] = tensor
    needed = ("weight", *state_names(settings))
    if not all(n in pieces for n in needed if n != "weight_format"):
        return
    del ctx.state["pieces"][module_name]
    weight = pieces.pop("weight")
    if four_bit:
        module._parameters["weight"] = bnb.nn.Params4bit.from_prequantized(
            data=weight, quantized_stats=pieces, requires_grad=False, device=weight.device, module=module)
    else:
        kwargs = dict(module.weight.__dict__)
        kwargs["SCB"] = pieces["SCB"]
        module._parameters["weight"] = bnb.nn.Int8Params(weight, requires_grad=False, **kwargs).to(weight.device)
    module._is_hf_initialized = True


def cpu_quantizer(ctx: QuantizationContext, settings: BnbSettings) -> Any:
    """This load's :class:`~loadstone_bnb.cpu_quantize.ChunkedOnCpu` (it counts what it quantized,
    for the report), or ``None`` where the option ``cpu_quantizer`` asks for bitsandbytes' own op."""
    from .cpu_quantize import ChunkedOnCpu

    if settings.cpu_quantizer != CHUNKED:
        return None
    if "cpu_quantizer" not in ctx.state:
        ctx.state["cpu_quantizer"] = ChunkedOnCpu()
    return ctx.state["cpu_quantizer"]


def _quantize(module: Any, value: Any, four_bit: bool, chunked: Any = None) -> None:
    """The conversion transformers' Bnb4bitQuantize / Bnb8bitQuantize ops apply, on ``value``'s
    device; a 4-bit weight on the CPU through ``chunked`` (a ``ChunkedOnCpu``) where given."""
    import bitsandbytes as bnb
    from transformers.pytorch_utils import Conv1D

    if issubclass(getattr(module, "source_cls", type(None)), Conv1D):
        value = value.T  # GPT-2 stores (in, out)
    old = module.weight
    if four_bit:
        with chunked if chunked is not None and value.device.type == "cpu" else contextlib.nullcontext():
            new = bnb.nn.Params4bit(value, requires_grad=False, **old.__dict__).to(value.device)
    else:
        kwargs = dict(old.__dict__)
        kwargs.pop("SCB", None)
        # transformers moves the weight to the CPU and lets Int8Params.to(device) quantize it there
        # (a round trip through host memory per weight); _quantize is what that .to() runs, called
        # where the weight already is: the same fp16 cast and int8_vectorwise_quant, no round trip.
        new = bnb.nn.Int8Params(value, requires_grad=False, **kwargs)
        new = new._quantize(value.device)
    module._parameters["weight"] = new
    module._is_hf_initialized = True


def finish(model: Any, ctx: QuantizationContext) -> None:
    """What ``from_pretrained`` does after loading: the quantizer's post-processing (flags such as
    ``is_loaded_in_4bit`` that peft reads, ``config.quantization_config``) and ``model.hf_quantizer``."""
    hf_quantizer = ctx.state.get("hf_quantizer")
    if hf_quantizer is None:  # the transformers engine did all of it
        return
    pending = ctx.state.get("pieces") or {}
    if pending:
        from loadstone import WeightsMismatchError

        name, pieces = next(iter(pending.items()))
        raise WeightsMismatchError(
            f"the pre-quantized layer {name!r} is incomplete in the checkpoint: it has {', '.join(sorted(pieces))}.",
            field=f"{name} quantization state", found=", ".join(sorted(pieces)),
            fix="re-save the checkpoint with save_pretrained; its quantization state is damaged")
    model.hf_quantizer = hf_quantizer
    hf_quantizer.postprocess_model(model)
