"""How many bytes a bitsandbytes-quantized model occupies: the estimate ``loadstone plan`` uses,
and the measurement of a loaded model that the estimate is checked against.

The layout these numbers follow (bitsandbytes 0.46-0.50, ``bitsandbytes.functional.quantize_4bit``
and ``Int8Params``):

* 4-bit (nf4/fp4): the weight packed two values per byte, plus one float32 ``absmax`` per block
  of 64 values and a 16-entry float32 code book. With double quantization the ``absmax`` values
  are themselves quantized to one byte each, in blocks of 256, which adds a float32 offset, one
  float32 ``absmax`` per 256 blocks and a 256-entry float32 code book per weight.
* int8: one byte per value plus one float32 scale (``SCB``) per output row.

Everything else (embeddings, norms, biases, the modules kept in full precision) keeps the load
dtype.
"""

from __future__ import annotations

import math
from typing import Any

FLOAT32 = 4
BLOCKSIZE_4BIT = 64          # Params4bit's default block size
NESTED_BLOCKSIZE = 256       # quantize_4bit(compress_statistics=True) re-quantizes absmax in these blocks
CODE_4BIT_ENTRIES = 16       # the nf4/fp4 code book
CODE_NESTED_ENTRIES = 256    # the dynamic 8-bit code book of double quantization


def four_bit_bytes(numel: int, *, double_quant: bool, blocksize: int = BLOCKSIZE_4BIT) -> int:
    """Bytes of one 4-bit weight with ``numel`` values, quantization state included."""
    packed = math.ceil(numel / 2)
    blocks = math.ceil(numel / blocksize)
    code = CODE_4BIT_ENTRIES * FLOAT32
    if not double_quant:
        return packed + blocks * FLOAT32 + code
    nested_blocks = math.ceil(blocks / NESTED_BLOCKSIZE)
    scales = blocks * 1 + FLOAT32 + nested_blocks * FLOAT32 + CODE_NESTED_ENTRIES * FLOAT32
    return packed + scales + code


def int8_bytes(numel: int, out_features: int) -> int:
    """Bytes of one int8 weight: the values plus a float32 scale per output row."""
    return numel + out_features * FLOAT32


# Bytes per weight element that bitsandbytes' CPU quantization allocates besides its input and
# outputs, for a float32 input (bitsandbytes 0.50, ``backends/default/ops.py``: element-wise torch
# ops in float32, an int32 bucket index, fp4's int64 reordering). Measured with loadstone's
# conformance kit (``AllocationPeak.transient_peak``) on weights from 64x64 to 4096x4096, which
# agree within 0.07 B per element; the kit's peak check fails when a release needs more. On CUDA
# bitsandbytes quantizes in its kernels, without work tensors of this size.
CPU_WORKSPACE_PER_ELEMENT = {"nf4": 9.57, "fp4": 24.07, "int8": 10.07}
# The chunked 4-bit quantizer (cpu_quantizer="chunked", loadstone_bnb.cpu_quantize) works on at
# most CHUNKED_PIECE values at once, with this many bytes per value of the piece (measured as
# above: 10.3 nf4, 15.2 fp4, on weights from 64x64 to 4096x4096) or, where its probe sends a
# piece to bitsandbytes' op, that op's CPU_WORKSPACE_PER_ELEMENT; besides, per value of the whole
# weight, the block scales and double quantization's work on them (measured 0.08 B).
CHUNKED_PIECE = 1 << 18  # loadstone_bnb.cpu_quantize.CHUNK (which imports torch)
CHUNKED_PER_VALUE = {"nf4": 11.0, "fp4": 16.0}
CHUNKED_PER_WEIGHT_VALUE = 8 / BLOCKSIZE_4BIT


def cpu_quantize_workspace(numel: int, method: str, *, element_size: int, transposed: bool = False,
                           chunked: bool = False) -> int:
    """Work bytes quantizing one weight of ``numel`` values on the CPU allocates, the values
    arriving with ``element_size`` bytes each; ``transposed``: GPT-2's ``Conv1D`` weight, which
    4-bit quantization first copies into a contiguous layout; ``chunked``: 4-bit through
    loadstone's chunked quantizer (its work is bounded by the piece, whichever way a piece goes)."""
    copy = element_size * numel if transposed and method != "int8" else 0
    if chunked and method != "int8":
        piece = min(numel, CHUNKED_PIECE)
        per_value = max(CHUNKED_PER_VALUE[method], CPU_WORKSPACE_PER_ELEMENT[method] + 4)
        return math.ceil(piece * per_value + numel * CHUNKED_PER_WEIGHT_VALUE) + copy
    per_element = CPU_WORKSPACE_PER_ELEMENT[method]
    if method != "int8":
        per_element += 4 if element_size != 4 else 0
    return math.ceil(numel * per_element) + copy


def bits_per_parameter(method: str, *, double_quant: bool = True) -> float:
    """Asymptotic bits per quantized parameter (large layers; per-weight constants vanish)."""
    if method == "int8":
        return 8.0
    scales = (8 + FLOAT32 * 8 / NESTED_BLOCKSIZE) / BLOCKSIZE_4BIT if double_quant else FLOAT32 * 8 / BLOCKSIZE_4BIT
    return 4.0 + scales


def measured_bytes(model: Any) -> int:
    """Bytes a loaded model really holds: parameters, buffers, 4-bit ``quant_state`` tensors and
    int8 scales, each storage counted once (tied weights and aliases share storage).

    A 4-bit layer that bitsandbytes repacked for its CPU inference kernel after a forward (see
    :mod:`loadstone_bnb.cpu_kernel`) is counted in the layout it was loaded in, and an int8
    layer's scales wherever its forward moved them, so the figure does not depend on whether a
    forward ran."""
    import torch

    from .cpu_kernel import canonical_state_bytes

    seen: dict[tuple[str, int], int] = {}
    repacked = 0

    def add(tensor: Any) -> None:
        if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
            return
        storage = tensor.untyped_storage()
        seen[(str(tensor.device), storage.data_ptr())] = storage.nbytes()

    def add_quant_state(state: Any) -> None:
        nonlocal repacked
        if state is None:
            return
        canonical = canonical_state_bytes(state)
        if canonical is not None:
            repacked += canonical
            return
        for name in ("absmax", "code", "offset"):
            add(getattr(state, name, None))
        add_quant_state(getattr(state, "state2", None))

    for tensor in list(model.parameters()) + list(model.buffers()):
        add(tensor)
        add_quant_state(getattr(tensor, "quant_state", None))
        add(getattr(tensor, "SCB", None))
    for module in model.modules():
        # An int8 layer's first forward moves the weight's int8 values and scales onto the layer's
        # matmul state (weight.SCB becomes None): counted there, the figure stays the same.
        state = getattr(module, "state", None)
        for name in ("CB", "SCB"):
            add(getattr(state, name, None))
    return sum(seen.values()) + repacked
