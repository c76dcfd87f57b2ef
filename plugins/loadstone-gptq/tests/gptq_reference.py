"""An independent GPTQ reference for the tests: packing and unpacking written from the format's
definition, not from gptqmodel, transformers or optimum.

The format, for a layer with ``in`` inputs, ``out`` outputs, ``b`` bits and groups of inputs:

* ``qweight`` int32 ``[in * b / 32, out]``: for each output column, the codes of all inputs as one
  little-endian bit stream (code ``i`` in bits ``[i*b, (i+1)*b)``), cut into 32-bit words;
* ``qzeros`` int32 ``[groups, out * b / 32]``: for each group row, the zero points of all outputs as
  such a bit stream; format v1 (auto-gptq's) stores each zero point minus one, v2 stores it as is;
* ``scales`` float16 ``[groups, out]``; ``g_idx`` int32 ``[in]``: the group of each input;
* the weight: ``W[o, i] = scales[g_idx[i], o] * (code[i, o] - zero[g_idx[i], o])``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack ``codes`` (non-negative, < 2**bits) along axis 0 into int32 words (bit streams per column)."""
    rows, cols = codes.shape
    stream = np.zeros((rows * bits, cols), dtype=np.uint8)
    for bit in range(bits):
        stream[bit::bits] = (codes >> bit) & 1
    words = -(-rows * bits // 32)
    stream = np.concatenate([stream, np.zeros((words * 32 - rows * bits, cols), np.uint8)])
    weights = (np.uint64(1) << np.arange(32, dtype=np.uint64))[:, None]
    packed = (stream.reshape(words, 32, cols).astype(np.uint64) * weights).sum(axis=1)
    return packed.astype(np.uint32).view(np.int32)


def unpack(words: np.ndarray, bits: int, rows: int) -> np.ndarray:
    """Inverse of :func:`pack`: ``rows`` codes per column."""
    as_unsigned = words.view(np.uint32).astype(np.uint64)
    stream = ((as_unsigned[:, None, :] >> np.arange(32, dtype=np.uint64)[None, :, None]) & 1).reshape(-1, words.shape[1])
    stream = stream[: rows * bits]
    codes = np.zeros((rows, words.shape[1]), dtype=np.int64)
    for bit in range(bits):
        codes |= stream[bit::bits].astype(np.int64) << bit
    return codes


def dequantize(qweight: Any, qzeros: Any, scales: Any, g_idx: Any, bits: int, v1: bool) -> torch.Tensor:
    """The float32 weight ``[out, in]`` a checkpoint's tensors mean (exact: no rounding)."""
    g_idx = np.asarray(g_idx, dtype=np.int64)
    codes = unpack(np.asarray(qweight), bits, len(g_idx))
    zeros = unpack(np.asarray(qzeros).T.copy(), bits, np.asarray(scales).shape[1]).T
    if v1:
        zeros = zeros + 1
    scale = np.asarray(torch.as_tensor(scales).float())
    weight = scale[g_idx] * (codes - zeros[g_idx])
    return torch.from_numpy(weight.T.astype(np.float32))


def quantized_layers(state: dict[str, torch.Tensor]) -> list[str]:
    """Linear layers inside the numbered decoder blocks, by their checkpoint names (Llama-style
    ``model.layers.N.*_proj``, GPT-2's ``transformer.h.N`` Conv1D layers)."""
    return sorted(k[: -len(".weight")] for k, v in state.items() if v.dim() == 2 and (
        (k.endswith("_proj.weight") and ".layers." in k) or (k.startswith("transformer.h.") and "ln_" not in k)))


def is_conv1d(layer: str) -> bool:
    """GPT-2's Conv1D stores its weight as [in, out]; nn.Linear as [out, in]."""
    return layer.startswith("transformer.h.")


def write_gptq_checkpoint(plain: Path, out: Path, *, bits: int, group_size: int, desc_act: bool, sym: bool,
                          v1: bool, legacy: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    """Turn the plain checkpoint in ``plain`` into a GPTQ checkpoint in ``out`` with known random
    codes, zero points and scales; return each quantized layer's exact float32 weight ``[out, in]``.

    ``legacy`` writes only an auto-gptq ``quantize_config.json`` (no quantization_config)."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    state = load_file(str(plain / "model.safetensors"))
    maxq = 2 ** bits - 1
    reference: dict[str, torch.Tensor] = {}
    for layer in quantized_layers(state):
        n_out, n_in = state.pop(f"{layer}.weight").shape
        if is_conv1d(layer):
            n_in, n_out = n_out, n_in
        size = n_in if group_size == -1 else group_size
        groups = -(-n_in // size)
        codes = rng.integers(0, maxq + 1, size=(n_in, n_out))
        if sym:
            zeros = np.full((groups, n_out), (maxq + 1) // 2)
        else:  # v1 stores zero - 1, so a zero point of 0 is not representable there
            zeros = rng.integers(1 if v1 else 0, maxq + 1, size=(groups, n_out))
        scales = torch.from_numpy(rng.uniform(0.002, 0.03, size=(groups, n_out))).half()
        g_idx = np.arange(n_in) // size
        if desc_act:
            g_idx = rng.permutation(g_idx)
        stored_zeros = (zeros - 1) & maxq if v1 else zeros
        state[f"{layer}.qweight"] = torch.from_numpy(pack(codes, bits))
        state[f"{layer}.qzeros"] = torch.from_numpy(pack(stored_zeros.T.copy(), bits).T.copy())
        state[f"{layer}.scales"] = scales
        state[f"{layer}.g_idx"] = torch.from_numpy(g_idx.astype(np.int32))
        scale = scales.float().numpy()
        reference[layer] = torch.from_numpy((scale[g_idx] * (codes - zeros[g_idx])).T.astype(np.float32))
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((plain / "config.json").read_text())
    settings = {"bits": bits, "group_size": group_size, "desc_act": desc_act, "sym": sym, "true_sequential": True,
                "damp_percent": 0.01}
    if legacy:  # what auto-gptq 0.7 wrote
        legacy_file = {**settings, "static_groups": False, "model_name_or_path": None, "model_file_base_name": "model",
                       "quant_method": "gptq", "checkpoint_format": "gptq" if v1 else "gptq_v2"}
        (out / "quantize_config.json").write_text(json.dumps(legacy_file, indent=2))
    else:
        config["quantization_config"] = {**settings, "quant_method": "gptq", "checkpoint_format": "gptq" if v1
                                         else "gptq_v2", "meta": {"quantizer": ["loadstone-tests"]}}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return reference


def write_plain_twin(base: Path, out: Path, weights: dict[str, torch.Tensor]) -> Path:
    """The checkpoint in ``base`` (plain or GPTQ) with the given layers stored as plain ``weight``
    tensors and no quantization config: the unquantized model a GPTQ checkpoint means, for
    comparing logits. Everything else is taken as ``base`` stores it."""
    out.mkdir(parents=True, exist_ok=True)
    state = load_file(str(base / "model.safetensors"))
    for layer, weight in weights.items():
        for piece in ("qweight", "qzeros", "scales", "g_idx"):
            state.pop(f"{layer}.{piece}", None)
        state[f"{layer}.weight"] = (weight.T if is_conv1d(layer) else weight).float().contiguous()
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((base / "config.json").read_text())
    config.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out
