"""Do the checkpoint's tensors fit the architecture? Decided from headers, before any weight is read.

transformers 5 renames and fuses checkpoint tensors while loading (a Mixtral checkpoint stores
``experts.0.w1.weight`` per expert; the model holds one fused ``experts.gate_up_proj``). Rather
than re-deriving those rules, :func:`check_weights_fit_model` runs transformers' own loading
pass (``convert_and_load_state_dict_in_model`` with the model's ``get_model_conversion_mapping``)
on a meta-device copy of the model, fed with meta tensors shaped as the headers say. It reads no
tensor data and allocates no memory, and reports exactly the missing, unexpected and mismatched
keys that ``from_pretrained`` would report after reading everything.

Pre-quantized checkpoints are not pre-checked: their packed tensors and quantization state
(e.g. bitsandbytes' ``weight.absmax``, ``weight.quant_state.*``) only make sense to the
quantization backend that will load them, and the post-load check in :mod:`loadstone.weights`
still refuses missing or unexpected keys. The report carries a note saying so.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Iterable

from .checkpoint import CheckpointInventory
from .errors import WeightsMismatchError

_SHOW = 8  # names listed per category; the counts are always complete


def _torch_dtype(code: str) -> Any:
    import torch

    names = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
             "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
             "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
    # Only shapes matter here; an exotic dtype is stood in for by uint8.
    return getattr(torch, names.get(code, "uint8"), torch.uint8)


def _listing(names: Iterable[str]) -> str:
    names = sorted(names)
    return ", ".join(names[:_SHOW]) + (f" ... ({len(names) - _SHOW} more)" if len(names) > _SHOW else "")


def head_keys(model: Any, config: Any, keys: Iterable[str]) -> set[str]:
    """Keys of a task head the checkpoint was not saved with (e.g. ``score.weight`` when a causal-LM
    checkpoint is loaded for sequence classification): expected to be new or dropped, not an error."""
    saved_as = (getattr(config, "architectures", None) or [None])[0]
    prefix = getattr(model, "base_model_prefix", "") or ""
    if saved_as is None or saved_as == type(model).__name__ or not prefix:
        return set()
    return {k for k in keys if not k.startswith(prefix + ".")}


def _run_transformers_pass(model: Any, inventory: CheckpointInventory) -> Any:
    import torch
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import convert_and_load_state_dict_in_model
    from transformers.modeling_utils import LoadStateDictConfig

    from .weights import transformers_progress

    state = {name: torch.empty(info.shape, dtype=_torch_dtype(info.dtype), device="meta")
             for name, info in inventory.tensors.items()}
    load_config = LoadStateDictConfig(device_map={"": "meta"}, dtype=None,
                                      weight_mapping=get_model_conversion_mapping(model))
    with transformers_progress(False):
        info, _ = convert_and_load_state_dict_in_model(model, state, load_config)
    adjust = getattr(model, "_adjust_missing_and_unexpected_keys", None)
    if adjust is not None:  # the model's own ignore patterns (e.g. rotary inv_freq), as from_pretrained applies
        adjust(info)
    return info


def check_weights_fit_model(skeleton: Any, inventory: CheckpointInventory, config: Any,
                            folder: Path, *, in_place: bool = False) -> list[str]:
    """Raise :class:`WeightsMismatchError` unless the checkpoint has exactly the architecture's tensors.

    :param skeleton: the model on the meta device. The check runs transformers' loading pass, which
        replaces its (meta) parameters with ones shaped and typed as the checkpoint's; it works on a
        copy unless ``in_place`` (the caller's last use of the skeleton: deep-copying a 70B
        skeleton costs a large part of a plan).
    :return: notes for the load report (tied weights, new or dropped task heads, skipped checks).
    """
    if getattr(config, "quantization_config", None):
        return ["tensor names and shapes of this pre-quantized checkpoint are checked after loading (packed "
                "tensors and quantization state are the quantization backend's to interpret)"]
    if not inventory.tensors:
        return ["tensor names and shapes are checked after loading (no tensor list was readable beforehand)"]
    model = skeleton if in_place else copy.deepcopy(skeleton)
    try:
        info = _run_transformers_pass(model, inventory)
    except Exception as exc:  # a transformers internal changed: fall back to the post-load check, say so
        return [f"the pre-load tensor check could not run ({type(exc).__name__}: {exc}); tensors are checked "
                f"after loading instead"]
    missing, unexpected = set(info.missing_keys), set(info.unexpected_keys)
    notes = []
    tied = dict(getattr(model, "all_tied_weights_keys", {}) or {})
    for target, source in sorted(tied.items()):
        if target in missing and source not in missing:
            missing.discard(target)
        elif source in missing and target not in missing:  # transformers ties the other way round then
            missing.discard(source)
        else:
            continue
        notes.append(f"tied weights: {target} shares {source} (stored once in the checkpoint)")
    new_head, dropped_head = head_keys(model, config, missing), head_keys(model, config, unexpected)
    if new_head:
        notes.append(f"new task head for {type(model).__name__}, randomly initialised (train it, e.g. with peft "
                     f"modules_to_save): {_listing(new_head)}")
    if dropped_head:
        notes.append(f"the checkpoint's own head is not used by {type(model).__name__}: {_listing(dropped_head)}")
    missing -= new_head
    unexpected -= dropped_head
    mismatched = sorted(info.mismatched_keys, key=lambda m: m[0])
    broken = {k: _last_line(v) for k, v in (info.conversion_errors or {}).items()}
    missing -= set(broken)
    if missing or unexpected or mismatched or broken:
        raise _mismatch_error(skeleton, inventory, folder, missing, unexpected, mismatched, broken)
    return notes


def _last_line(text: Any) -> str:
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip() and not ln.startswith((" ", "Traceback"))]
    errors = [ln for ln in lines if ln.startswith(("RuntimeError", "ValueError", "TypeError"))]
    return (errors or lines or ["conversion failed"])[-1][:200]


def _mismatch_error(skeleton: Any, inventory: CheckpointInventory, folder: Path, missing: set[str],
                    unexpected: set[str], mismatched: list, broken: dict[str, str]) -> WeightsMismatchError:
    arch = type(skeleton).__name__
    counts, parts = [], []
    if missing:
        counts.append(f"{len(missing)} missing")
        parts.append(f"missing from the checkpoint (they would be randomly initialised): {_listing(missing)}")
    if unexpected:
        counts.append(f"{len(unexpected)} unexpected")
        where = {inventory.tensors[k].file.name for k in unexpected if k in inventory.tensors}
        parts.append(f"unexpected (in {', '.join(sorted(where)) or 'the checkpoint'}, unknown to {arch}): "
                     f"{_listing(unexpected)}")
    if mismatched:
        counts.append(f"{len(mismatched)} with the wrong shape")
        parts.append("wrong shape: " + "; ".join(f"{name} is {list(found)} in the checkpoint but {list(want)} in "
                                                 f"the model" for name, found, want in mismatched[:_SHOW]))
    if broken:
        counts.append(f"{len(broken)} that cannot be assembled from the checkpoint's tensors")
        parts.append("cannot be assembled: " + "; ".join(f"{name} ({why})" for name, why in
                                                          sorted(broken.items())[:_SHOW]))
    where = inventory.index_file or (inventory.files[0] if inventory.files else folder)
    return WeightsMismatchError(
        f"the weights in {Path(where).name} do not fit {arch} as config.json describes it: tensors "
        + ", ".join(counts) + ".", file=where, field="tensor names and shapes",
        expected=f"exactly the tensors {arch} defines (tied weights excepted)", found=". ".join(parts),
        fix="check that config.json and the weights belong together (same model type and size); if the checkpoint "
            "is damaged, re-download or re-save it with save_pretrained")
