"""Which checkpoint tensors fill which model tensors, and do they fit? Decided from headers, before
any weight is read.

transformers 5 renames and fuses checkpoint tensors while loading (a Mixtral checkpoint stores
``experts.0.w1.weight`` per expert; the model holds one fused ``experts.gate_up_proj``). Rather
than re-deriving those rules, :func:`build_tensor_map` applies transformers' own
(``get_model_conversion_mapping``, ``rename_source_key``) to every key of the headers, and runs
each fusion on meta tensors shaped as the headers say: no tensor data is read and no memory
allocated. It finds exactly the missing, unexpected and mismatched tensors ``from_pretrained``
would report after reading everything, and the resulting :class:`~loadstone.contract.tensors.TensorMap`
is what the native engine streams by.

For a pre-quantized checkpoint, tensors the skeleton has no parameter for (``weight.absmax``,
``SCB``, GPTQ's ``qweight``) are handed to the quantization backend's ``accepts_tensor``; what it
refuses is unexpected, and the shapes of the tensors it converts are its own to check. A
converted tensor the checkpoint lacks under its own name (GPTQ stores no ``weight``) is assembled
by the backend from the tensors it accepted for the same module, and missing only without them.
"""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterable

from ...contract.checkpoint import CheckpointInventory
from ...contract.errors import WeightsMismatchError
from ...contract.tensors import TensorGroup, TensorMap
from ...safetensors_header import TORCH_DTYPE_NAMES

_SHOW = 8  # names listed per category; the counts are always complete
_FLOAT_VALUES = {"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ"}


def _stored_kind(code: str) -> str:
    """What values a safetensors dtype holds: ``float``, ``int``, ``bool``, ``complex``, or
    ``other`` (packed or scale formats with no value of their own, e.g. F4, F8_E8M0)."""
    if code in _FLOAT_VALUES:
        return "float"
    if code == "BOOL":
        return "bool"
    if code[0] in "IU":
        return "int"
    return "complex" if code.startswith("C") else "other"


def _model_kind(dtype: Any) -> str:
    if dtype.is_floating_point:
        return "float"
    if dtype.is_complex:
        return "complex"
    return "bool" if str(dtype) == "torch.bool" else "int"


def _loadable(code: str) -> bool:
    import torch

    name = TORCH_DTYPE_NAMES.get(code)
    return name is not None and hasattr(torch, name)

def _torch_dtype(code: str) -> Any:
    import torch

    # Only shapes matter for the check; an exotic dtype is stood in for by uint8.
    return getattr(torch, TORCH_DTYPE_NAMES.get(code, "uint8"), torch.uint8)


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


def _owner(name: str, modules: dict[str, Any]) -> tuple[str, str] | None:
    """``(module name, rest)`` for the deepest module whose name prefixes ``name``."""
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in modules:
            return prefix, ".".join(parts[i:])
    return None


def _planned_dtypes(model: Any, state: dict[str, Any], dtype: Any) -> dict[str, str]:
    """The dtype each tensor loads in, by transformers' rule: the model's dtype plan (e.g. modules
    kept in float32) first, else the skeleton's own dtype for that tensor."""
    import re

    plan = model._get_dtype_plan(dtype) if hasattr(model, "_get_dtype_plan") else {}
    patterns = [(re.compile(p), d) for p, d in (plan or {}).items()]
    out = {}
    for name, tensor in state.items():
        chosen = next((d for p, d in patterns if p.search(name)), tensor.dtype)
        out[name] = str(chosen).replace("torch.", "")
    return out


def build_tensor_map(model: Any, inventory: CheckpointInventory, config: Any, folder: Path, *, dtype: Any,
                     converts: Callable[[str], bool] = lambda name: False,
                     accepts: Callable[[str, str, Any], bool] | None = None,
                     pre_quantized: bool = False, task_asked: bool = True) -> tuple[TensorMap, list[str]]:
    """Map every checkpoint tensor onto the skeleton ``model`` and refuse a checkpoint that does not fit.

    :param model: the skeleton on the meta device (not changed).
    :param converts: whether the quantization backend converts a model tensor (its shape and dtype
        are then the backend's to check).
    :param accepts: ``(module name, rest of key, module) -> bool``: whether the backend takes a
        checkpoint tensor the skeleton has no parameter for; ``None``: nothing extra is taken.
    :param pre_quantized: the checkpoint is pre-quantized: the stored dtypes of the tensors the
        backend converts are its own to judge (packed integers, scales).
    :param task_asked: the task was asked for (by the user, or an adapter's ``task_type``), so a head
        the checkpoint lacks is new by intent; with the default task it is refused instead (a
        headless save, or a misspelt ``architectures``, would otherwise get a random frozen head).
    :return: the tensor map and notes for the report (tied weights, new or dropped task heads).
    :raises WeightsMismatchError: tensors missing, unexpected, of the wrong shape or of a dtype that
        cannot fill their parameter (a BOOL or integer tensor for a floating weight would be cast
        silently; a dtype this torch has no type for cannot be read at all), or that cannot be
        assembled.
    """
    import torch
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

    state = model.state_dict()
    modules = dict(model.named_modules())
    # A checkpoint whose every tensor is a model tensor under its own name (what save_pretrained
    # writes for most models) needs no renaming or fusion rule; building transformers' table of
    # them costs a third of a second on first use, a large part of a fast load.
    mapping = [] if set(inventory.tensors) <= set(state) else get_model_conversion_mapping(model)
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    prefix = getattr(model, "base_model_prefix", None)

    renamed_to: dict[str, list[str]] = {}  # target -> sources (1:1 groups)
    fused: dict[str, tuple[Any, list[tuple[str, str]]]] = {}  # first target -> (converter, [(source, pattern)])
    extras: dict[str, tuple[str, str]] = {}
    unexpected: set[str] = set()
    for key in sorted(inventory.tensors, key=dot_natural_key):
        renamed, pattern = rename_source_key(key, renamings, converters, prefix, state)
        if renamed not in state and key in state:
            renamed, pattern = rename_source_key(key, [], [], base_model_prefix=prefix, meta_state_dict=state)
        if renamed in state:
            if pattern is not None:
                entry = fused.setdefault(renamed, (copy.deepcopy(by_pattern[pattern]), []))
                entry[1].append((key, pattern))
            else:
                renamed_to.setdefault(renamed, []).append(key)
            continue
        owner = _owner(renamed, modules) if accepts is not None else None
        if owner is not None and accepts(owner[0], owner[1], modules[owner[0]]):
            extras[key] = owner
        elif pattern is not None:
            converter = by_pattern[pattern]
            unexpected.update(renamed.replace(converter.target_patterns[0], t) for t in converter.target_patterns)
        else:
            unexpected.add(renamed)

    groups: list[TensorGroup] = []
    mismatched: list[tuple[str, tuple, tuple]] = []
    broken: dict[str, str] = {}
    filled: set[str] = set()
    for target, sources in renamed_to.items():
        if len(sources) > 1:  # two checkpoint names for one tensor (a legacy and a new one): ambiguous
            unexpected.update(sources[1:])
        info = inventory.tensors[sources[0]]
        filled.add(target)
        if not converts(target) and tuple(info.shape) != tuple(state[target].shape):
            mismatched.append((target, info.shape, tuple(state[target].shape)))
        groups.append(TensorGroup((target,), (sources[0],)))
    for first, (converter, sources) in fused.items():
        meta = copy.deepcopy(converter)
        for key, pattern in sources:
            info = inventory.tensors[key]
            meta.add_tensor(first, key, pattern, torch.empty(info.shape, dtype=_torch_dtype(info.dtype), device="meta"))
        try:
            produced = meta.convert(first, model=model, config=model.config)
        except Exception as exc:  # transformers' ops raise plain errors for tensors that do not fit together
            broken[first] = _last_line(f"{type(exc).__name__}: {exc}")
            continue
        targets = []
        for name, value in produced.items():
            value = value[0] if isinstance(value, list) else value
            if name not in state:
                unexpected.add(name)
                continue
            targets.append(name)
            filled.add(name)
            if not converts(name) and tuple(value.shape) != tuple(state[name].shape):
                mismatched.append((name, tuple(value.shape), tuple(state[name].shape)))
        groups.append(TensorGroup(tuple(targets), tuple(k for k, _ in sources), converter,
                                  tuple(p for _, p in sources)))

    wrong_dtype = _dtype_problems(groups, extras, inventory, state, converts, pre_quantized)
    missing = set(state) - filled
    # A converted tensor the checkpoint stores only in pieces under other names (GPTQ keeps a
    # layer's weight as qweight, qzeros, scales and g_idx) is the backend's to assemble from what
    # it accepted for that module; it is missing only when the backend accepted nothing there.
    pieces_for = {module_name for module_name, _ in extras.values()}
    assembled = {name for name in missing if converts(name) and name.rpartition(".")[0] in pieces_for}
    missing -= assembled
    info = SimpleNamespace(missing_keys=missing, unexpected_keys=unexpected)
    adjust = getattr(model, "_adjust_missing_and_unexpected_keys", None)
    if adjust is not None:  # the model's own ignore patterns (e.g. rotary inv_freq), as from_pretrained applies
        adjust(info)
    missing, unexpected = set(info.missing_keys), set(info.unexpected_keys)
    notes, tied = [], {}
    for target, source in sorted((getattr(model, "all_tied_weights_keys", {}) or {}).items()):
        if target in missing and source not in missing:
            missing.discard(target)
            tied[target] = source
        elif source in missing and target not in missing:  # transformers ties the other way round then
            missing.discard(source)
            tied[source] = target
        else:
            continue
        notes.append(f"tied weights: {target} shares {source} (stored once in the checkpoint)")
    new_head, dropped_head = head_keys(model, config, missing), head_keys(model, config, unexpected)
    if new_head and not task_asked:
        raise _unasked_head_error(model, config, inventory, folder, new_head)
    if new_head:
        notes.append(f"new task head for {type(model).__name__}, randomly initialised (train it, e.g. with peft "
                     f"modules_to_save): {_listing(new_head)}")
    if dropped_head:
        notes.append(f"the checkpoint's own head is not used by {type(model).__name__}: {_listing(dropped_head)}")
    missing -= new_head
    unexpected -= dropped_head
    missing -= set(broken)
    if missing or unexpected or mismatched or broken or wrong_dtype:
        raise _mismatch_error(model, inventory, folder, missing, unexpected,
                              sorted(mismatched, key=lambda m: m[0]), broken, wrong_dtype)
    dtypes = _planned_dtypes(model, state, dtype)
    converted = frozenset(t for t in filled if converts(t)) | frozenset(assembled)
    tensor_map = TensorMap(groups, extras, {k: v for k, v in dtypes.items() if k not in converted}, converted, tied,
                           frozenset(new_head))
    return tensor_map, notes


def _dtype_problems(groups: list[TensorGroup], extras: dict[str, Any], inventory: CheckpointInventory,
                    state: dict[str, Any], converts: Callable[[str], bool], pre_quantized: bool) -> dict[str, str]:
    """Checkpoint key -> why its stored dtype cannot fill the model tensor it is mapped to."""
    problems: dict[str, str] = {}
    for group in groups:
        for source in group.sources:
            code = inventory.tensors[source].dtype
            target = group.targets[0] if group.targets else None
            if not _loadable(code):
                problems[source] = f"{code}, which this torch has no dtype for"
            elif target is None or (pre_quantized and converts(target)):
                continue  # packed and scale tensors of a pre-quantized checkpoint: the backend's to judge
            else:
                want = "float" if converts(target) else _model_kind(state[target].dtype)
                if _stored_kind(code) != want:
                    problems[source] = (f"{code} in the checkpoint, but {target} is a {want} tensor "
                                        f"({str(state[target].dtype).replace('torch.', '')})")
    for key in extras:
        code = inventory.tensors[key].dtype
        if not _loadable(code):
            problems[key] = f"{code}, which this torch has no dtype for"
    return problems


def _last_line(text: Any) -> str:
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip() and not ln.startswith((" ", "Traceback"))]
    errors = [ln for ln in lines if ln.startswith(("RuntimeError", "ValueError", "TypeError"))]
    return (errors or lines or ["conversion failed"])[-1][:200]


def _unasked_head_error(model: Any, config: Any, inventory: CheckpointInventory, folder: Path,
                        head: set[str]) -> WeightsMismatchError:
    arch = type(model).__name__
    saved_as = (getattr(config, "architectures", None) or [None])[0]
    where = inventory.index_file or (inventory.files[0] if inventory.files else folder)
    return WeightsMismatchError(
        f"the checkpoint has no weights for {arch}'s head: config.json says it was saved as {saved_as}, and no "
        f"task was asked for, so the head would be random.", file=where, field="tensor names",
        expected=f"{arch}'s head in the checkpoint", found=f"missing: {_listing(head)}",
        fix=f"check config.json's architectures ({saved_as!r}); to train a new head on purpose, pass the task "
            f"(task='causal-lm', CLI --task; the adapter's task_type does the same)")


def _mismatch_error(skeleton: Any, inventory: CheckpointInventory, folder: Path, missing: set[str],
                    unexpected: set[str], mismatched: list, broken: dict[str, str],
                    wrong_dtype: dict[str, str]) -> WeightsMismatchError:
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
    if wrong_dtype:
        counts.append(f"{len(wrong_dtype)} of a dtype that cannot fill their parameter")
        parts.append("wrong dtype (it would be cast silently): " + "; ".join(
            f"{name} is {why}" for name, why in sorted(wrong_dtype.items())[:_SHOW]))
    where = inventory.index_file or (inventory.files[0] if inventory.files else folder)
    fix = ("check that config.json and the weights belong together (same model type and size); if the checkpoint "
           "is damaged, re-download or re-save it with save_pretrained")
    if wrong_dtype and not (missing or unexpected or mismatched or broken):
        fix = ("if the checkpoint is quantized, its config.json needs the quantization_config its quantizer wrote; "
               "otherwise re-save it with floating weights (save_pretrained)")
    return WeightsMismatchError(
        f"the weights in {Path(where).name} do not fit {arch} as config.json describes it: tensors "
        + ", ".join(counts) + ".", file=where, field="tensor names and shapes" if not wrong_dtype or (
            missing or unexpected or mismatched or broken) else "tensor dtypes",
        expected=f"exactly the tensors {arch} defines (tied weights excepted), in dtypes that fit them",
        found=". ".join(parts), fix=fix)
