"""The packed tensors of a GPTQ checkpoint, checked against the model before any weight is read.

The kernel maps checkpoint tensors onto the model and leaves the tensors a backend converts to the
backend. For GPTQ that is every quantized layer's ``qweight``, ``qzeros``, ``scales`` and
``g_idx``: all four must be there, with the shapes the layer's size, the bits and the group size
imply. A wrong group size is the usual way a hand-written ``quantize_config.json`` goes wrong, so it
gets its own message. :func:`check_plan` runs from the plugin's ``loadstone_after_plan`` hook on the
safetensors headers; :func:`tensor_problem` guards the same facts as each tensor is loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from loadstone import ConfigError, WeightsMismatchError

from .layers import INTEGER_PIECES, PIECES, packed_shapes
from .settings import GPTQSettings

_SHOW = 6
INTEGER_DTYPES = ("I32", "int32")


def packed_group_size(name: str, shape: tuple[int, ...], in_features: int) -> int | None:
    """The group size a stored ``scales`` or ``qzeros`` was packed with (its row count), if whole."""
    rows = shape[0] if name in ("scales", "qzeros") and shape else 0
    if not rows or in_features % rows:
        return None
    return in_features // rows if rows > 1 else -1


def piece_problem(layer: str, name: str, shape: tuple[int, ...], dtype: str, in_features: int, out_features: int,
                  settings: GPTQSettings) -> str | None:
    """What is wrong with one stored tensor of a quantized layer, or ``None``."""
    want = packed_shapes(in_features, out_features, settings.bits, settings.group_size)[name]
    if tuple(shape) != want:
        return (f"{layer}.{name} is {list(shape)}, expected {list(want)} for {in_features} -> {out_features} "
                f"at {settings.bits} bits, group_size {settings.group_size}")
    if name in INTEGER_PIECES and dtype.replace("torch.", "") not in INTEGER_DTYPES:
        return f"{layer}.{name} is stored as {dtype}, expected int32"
    return None


def problems_of_layer(layer: str, in_features: int, out_features: int, settings: GPTQSettings,
                      stored: Mapping[str, tuple[tuple[int, ...], str]]) -> list[str]:
    """What is wrong with one layer's stored tensors (``name -> (shape, dtype)``); empty if nothing."""
    absent = [name for name in PIECES if name not in stored]
    problems = [f"{layer} lacks {', '.join(absent)}"] if absent else []
    for name, (shape, dtype) in stored.items():
        problem = piece_problem(layer, name, shape, dtype, in_features, out_features, settings)
        if problem:
            problems.append(problem)
    return problems


def mismatch_error(problems: list[str], settings: GPTQSettings, file: Any) -> WeightsMismatchError:
    shown = "; ".join(problems[:_SHOW]) + (f"; ... ({len(problems) - _SHOW} more)" if len(problems) > _SHOW else "")
    return WeightsMismatchError(
        f"the GPTQ tensors of this checkpoint do not fit the model: {len(problems)} problem(s).", file=file,
        field="GPTQ tensors (qweight, qzeros, scales, g_idx)",
        expected=f"every quantized layer stored as qweight, qzeros, scales and g_idx for {settings.bits} bits, "
                 f"group_size {settings.group_size}", found=shown,
        fix="re-save or re-download the checkpoint: its GPTQ tensors do not match its own quantization config")


def group_size_error(packed_with: int, settings: GPTQSettings, config: str) -> ConfigError:
    name = Path(config).name
    return ConfigError(
        f"the GPTQ tensors were packed with group_size {packed_with}, but {name} says {settings.group_size} (every "
        f"quantized layer's scales and qzeros have the rows of group_size {packed_with}).", file=config,
        field="quantization_config.group_size", expected=packed_with, found=settings.group_size,
        fix=f"set group_size to {packed_with} in {name}")


def check_plan(plan: Any, settings: GPTQSettings, layers: Mapping[str, tuple[int, int]], config: str) -> None:
    """Check every quantized layer's stored tensors against the plan's tensor map and headers.

    ``layers`` maps each quantized layer's name to ``(in_features, out_features)``; ``config`` is
    the file the checkpoint's quantization settings came from."""
    tensor_map = plan.tensor_map
    if tensor_map is None:  # no headers before loading: tensor_problem guards the load instead
        return
    infos = plan.inventory.tensors
    by_layer: dict[str, dict[str, tuple[tuple[int, ...], str]]] = {name: {} for name in layers}
    for key, (module_name, name) in tensor_map.extras.items():
        if module_name in by_layer:
            by_layer[module_name][name] = (tuple(infos[key].shape), str(infos[key].dtype))
    plain = tensor_map.targets()
    problems, group_sizes = [], set()
    for layer, (in_features, out_features) in sorted(layers.items()):
        if f"{layer}.weight" in plain:
            problems.append(f"{layer} is stored unquantized (as weight), but the config quantizes it")
        problems += problems_of_layer(layer, in_features, out_features, settings, by_layer[layer])
        group_sizes |= {packed_group_size(name, shape, in_features) for name, (shape, _) in by_layer[layer].items()
                        if name in ("scales", "qzeros")}
    if not problems:
        return
    if len(group_sizes) == 1 and None not in group_sizes and group_sizes != {settings.group_size}:
        raise group_size_error(group_sizes.pop(), settings, config)
    where = plan.inventory.index_file or (plan.inventory.files[0] if plan.inventory.files else None)
    raise mismatch_error(problems, settings, where)


def tensor_problem(layer: str, name: str, tensor: Any, module: Any, settings: GPTQSettings) -> str | None:
    """What is wrong with one packed tensor as it is loaded into ``module``: its shape and dtype,
    and group indices that point at existing groups (an out-of-range ``g_idx`` would fail only at
    the first forward). ``None`` if nothing."""
    problem = piece_problem(layer, name, tuple(tensor.shape), str(tensor.dtype), module.in_features,
                            module.out_features, settings)
    if problem is None and name == "g_idx" and tensor.numel():
        groups = settings.groups(module.in_features)
        low, high = int(tensor.min()), int(tensor.max())
        if low < 0 or high >= groups:
            problem = f"{layer}.g_idx holds group numbers {low}..{high}, expected 0..{groups - 1}"
    return problem
