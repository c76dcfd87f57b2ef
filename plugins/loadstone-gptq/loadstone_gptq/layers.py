"""Which layers of a model a GPTQ checkpoint quantizes, their packed tensors, and their bytes.

transformers loads GPTQ through optimum, which swaps every plain ``nn.Linear`` (and GPT-2's
``Conv1D``) inside the model's repeated decoder blocks for a gptqmodel ``QuantLinear``, narrowed by
the checkpoint's ``block_name_to_quantize`` and ``modules_in_block_to_quantize``. The plan needs
the same answer without importing optimum (importing it imports gptqmodel, seconds): a layer is
quantized when it sits inside a numbered block (``model.layers.3.mlp.up_proj``). The native
engine checks this answer against optimum's real swap before any weight is read.

A quantized layer with ``in`` inputs and ``out`` outputs is stored as (``g`` groups of
``group_size`` inputs, 32-bit words)::

    qweight  int32  [ceil(in * bits / 32), out]   the codes, packed along the inputs
    qzeros   int32  [g, ceil(out * bits / 32)]    one zero point per group and output, packed
    scales   fp16   [g, out]                      one scale per group and output
    g_idx    int32  [in]                          the group of each input (a permutation with act-order)

and means ``W[i, o] = scales[g_idx[i], o] * (code[i, o] - zero[g_idx[i], o])``.
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping

PIECES = ("qweight", "qzeros", "scales", "g_idx")
INTEGER_PIECES = ("qweight", "qzeros", "g_idx")
WORD_BITS = 32
SCALE_BYTES = 2  # gptqmodel keeps scales in float16 whatever the model's dtype
_NUMBERED_BLOCK = re.compile(r"\.\d+(\.|$)")


def is_linear(module: Any) -> bool:
    """Plain ``nn.Linear`` (exact type: MoE routers subclass it and keep their own forward) or
    GPT-2's ``Conv1D``, the layer types transformers' GPTQ integration swaps."""
    import torch
    from transformers.pytorch_utils import Conv1D

    return type(module) is torch.nn.Linear or isinstance(module, Conv1D)


def features(module: Any) -> tuple[int, int]:
    """``(in_features, out_features)``; GPT-2's Conv1D stores its weight as ``[in, out]``."""
    if hasattr(module, "in_features"):
        return int(module.in_features), int(module.out_features)
    rows, cols = module.weight.shape
    return int(rows), int(cols)


def quantized(module_name: str, module: Any, config: Mapping[str, Any]) -> bool:
    """Whether transformers' GPTQ integration swaps this module, decided without importing it."""
    if not is_linear(module):
        return False
    prefix = config.get("block_name_to_quantize")
    inside = module_name.startswith(prefix) if prefix else bool(_NUMBERED_BLOCK.search(module_name))
    if not inside:
        return False
    chosen = config.get("modules_in_block_to_quantize")
    if chosen:
        return any(module_name.endswith(name) for group in chosen for name in group)
    return True


def packed_shapes(in_features: int, out_features: int, bits: int, group_size: int) -> dict[str, tuple[int, ...]]:
    """The shape of each stored tensor of one quantized layer."""
    groups = math.ceil(in_features / (in_features if group_size == -1 else group_size))
    return {
        "qweight": (math.ceil(in_features * bits / WORD_BITS), out_features),
        "qzeros": (groups, math.ceil(out_features * bits / WORD_BITS)),
        "scales": (groups, out_features),
        "g_idx": (in_features,),
    }


def layer_bytes(in_features: int, out_features: int, bits: int, group_size: int) -> int:
    """Bytes one quantized layer holds once loaded (its weight; the bias is counted apart)."""
    shapes = packed_shapes(in_features, out_features, bits, group_size)
    return sum(math.prod(shape) * (SCALE_BYTES if name == "scales" else 4) for name, shape in shapes.items())


def measured_bytes(model: Any) -> int:
    """Bytes a loaded model really holds: every parameter and buffer (GPTQ's packed tensors are
    buffers), each storage counted once (tied weights share one)."""
    import torch

    seen: dict[tuple[str, int], int] = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
            storage = tensor.untyped_storage()
            seen[(str(tensor.device), storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())
