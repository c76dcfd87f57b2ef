"""Stage 6, adapters: attach them with peft (and, during the plan stage, check them against the
base skeleton before any weight is read)."""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Any, Iterator

from ..contract.errors import AdapterError, LoadstoneError, UnsafeCheckpointError
from ..contract.request import LoadRequest
from ..contract.sources import ADAPTER_CONFIG, AdapterSource, ResolvedSource
from ..safetensors_header import read_safetensors_header
from .peft_support import without_unused_gptqmodel

_PREFIX = "base_model.model."
_LORA_LEAVES = {"lora_A": "A", "lora_B": "B", "lora_embedding_A": "eA", "lora_embedding_B": "eB"}


def adapter_tensor_shapes(adapter: AdapterSource, *, allow_pickle: bool) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of the adapter's weights, from the header only."""
    path = adapter.weights
    if path.suffix == ".safetensors":
        tensors, _ = read_safetensors_header(path)
        return {name: info.shape for name, info in tensors.items()}
    if not allow_pickle:
        raise UnsafeCheckpointError(
            f"adapter {adapter.name!r} stores its weights as pickle ({path.name}); loading pickle can execute code.",
            file=path, field="adapter weights", expected="adapter_model.safetensors", found=path.name,
            fix="re-save the adapter with safetensors, or pass allow_pickle=True to read it with "
                "torch.load(weights_only=True)")
    from .inspect.checkpoint import read_pickle_tensors

    return {name: info.shape for name, info in read_pickle_tensors(path).items()}


def _in_out(module: Any) -> tuple[int, int] | None:
    kind = type(module).__name__
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return int(module.in_features), int(module.out_features)
    if kind == "Conv1D":  # GPT-2 style: weight is (in, out)
        return int(module.weight.shape[0]), int(module.weight.shape[1])
    if hasattr(module, "num_embeddings") and hasattr(module, "embedding_dim"):
        return int(module.num_embeddings), int(module.embedding_dim)
    return None


def _matches_target(module_names: set[str], target: str) -> bool:
    return any(name == target or name.endswith("." + target) for name in module_names)


def validate_adapter(adapter: AdapterSource, skeleton: Any, *, allow_pickle: bool) -> dict[str, Any]:
    """Refuse adapters whose targets are absent from the base or whose shapes disagree.

    Returns a summary (modules touched, rank) for the report.
    """
    cfg_path = adapter.source.path / ADAPTER_CONFIG
    modules = dict(skeleton.named_modules())
    names = set(modules) - {""}
    targets = adapter.config.get("target_modules")
    if isinstance(targets, str):
        # peft's shorthand for every linear layer but the output head; peft expands it on the base
        if targets.lower() != "all-linear" and not any(re.fullmatch(targets, n) for n in names):
            raise AdapterError(
                f"adapter {adapter.name!r}: the target_modules pattern matches no module of the base model.",
                file=cfg_path, field="target_modules", expected="a regex matching module names such as "
                f"{sorted(names)[1] if len(names) > 1 else 'model.layers.0.self_attn.q_proj'}", found=targets,
                fix="check that the adapter was trained on this base model (or pass the right base=)")
    elif isinstance(targets, (list, tuple)):
        missing = [t for t in targets if not _matches_target(names, str(t))]
        if missing:
            raise AdapterError(
                f"adapter {adapter.name!r} targets modules the base model ({type(skeleton).__name__}) does not have: "
                f"{', '.join(map(str, missing))}.", file=cfg_path, field="target_modules",
                expected="module names present in the base", found=", ".join(map(str, missing)),
                fix="check that the adapter was trained on this base model (or pass the right base=)")

    shapes = adapter_tensor_shapes(adapter, allow_pickle=allow_pickle)
    if not shapes:
        raise AdapterError(f"adapter {adapter.name!r} has no tensors in {adapter.weights.name}.", file=adapter.weights,
                           field="tensors", expected="the adapter's weights", found="an empty file",
                           fix="re-save the adapter; the weights were not written")
    pairs: dict[str, dict[str, tuple[int, ...]]] = {}
    touched: set[str] = set()
    for key, shape in shapes.items():
        if 0 in shape:
            raise AdapterError(f"adapter {adapter.name!r}: tensor {key!r} is empty (shape {list(shape)}).",
                               file=adapter.weights, field=key, expected="a non-empty tensor", found=list(shape),
                               fix="re-save the adapter; its weights are damaged")
        if not key.startswith(_PREFIX):
            continue  # a model-level tensor (prompt embeddings, VeRA's shared matrices): peft's, see adapter_fit
        rest = key[len(_PREFIX):]
        parts = rest.split(".")
        owner = next((".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1) if ".".join(parts[:i]) in modules),
                     None)
        if owner is None:
            raise AdapterError(
                f"adapter {adapter.name!r}: tensor {key!r} belongs to a module the base model does not have.",
                file=adapter.weights, field=key, expected=f"a module of {type(skeleton).__name__}",
                found=".".join(parts[:-2]) or rest,
                fix="check that the adapter was trained on this base model (or pass the right base=)")
        leaf = parts[len(owner.split(".")):]
        touched.add(owner)
        kind = next((_LORA_LEAVES[p] for p in leaf if p in _LORA_LEAVES), None)
        if kind:
            pairs.setdefault(owner, {})[kind] = shape
    rank = None
    for owner, found in pairs.items():
        dims = _in_out(modules[owner])
        a, b = found.get("A") or found.get("eA"), found.get("B") or found.get("eB")
        if a is None or b is None:
            raise AdapterError(f"adapter {adapter.name!r}: module {owner!r} has only half of its LoRA pair.",
                               file=adapter.weights, field=owner, expected="lora_A and lora_B",
                               found=", ".join(sorted(found)), fix="re-save the adapter; its weights are incomplete")
        rank = rank or a[0]
        if dims is not None and len(a) == 2 and len(b) == 2:
            fan_in, fan_out = dims
            if a[1] != fan_in or b[0] != fan_out or a[0] != b[1]:
                raise AdapterError(
                    f"adapter {adapter.name!r}: the LoRA weights of {owner!r} do not fit the base model's layer "
                    f"({type(modules[owner]).__name__} {fan_in} -> {fan_out}).", file=adapter.weights,
                    field=f"{owner} lora_A/lora_B shapes",
                    expected=f"lora_A [r, {fan_in}] and lora_B [{fan_out}, r]",
                    found=f"lora_A {list(a)} and lora_B {list(b)}",
                    fix="the adapter was trained on a different model size; pass the matching base=")
    return {"modules": len(touched), "rank": rank}


@contextlib.contextmanager
def _peft_errors(adapter: AdapterSource) -> Iterator[None]:
    """What peft raises attaching an adapter the plan accepted, as an AdapterError naming it (the plan
    replays peft's attach on the meta device, see adapter_fit, so this is a second line only)."""
    try:
        yield
    except LoadstoneError:
        raise
    except (ValueError, TypeError, KeyError, RuntimeError, AttributeError, NotImplementedError) as exc:
        raise AdapterError(f"adapter {adapter.name!r}: peft could not attach it: {type(exc).__name__}: "
                           f"{str(exc).strip()[:300]}", file=adapter.source.path / ADAPTER_CONFIG,
                           field="(adapter)", fix="re-save the adapter with peft's save_pretrained; if it loads with "
                           "peft alone, report it to the maintainers of loadstone") from exc


def reloadable_base(base: ResolvedSource) -> tuple[str, str | None]:
    """What a saved adapter should name as its base so that it reloads from any folder, with
    loadstone or plain peft: the Hub id at the exact commit loaded, else the absolute folder."""
    if base.repo_id:
        return base.repo_id, base.commit or base.revision
    return str(Path(base.path).resolve()), None


def attach_adapters(model: Any, adapters: list[AdapterSource], request: LoadRequest,
                    base: ResolvedSource) -> tuple[Any, list[dict], list[str]]:
    """Wrap ``model`` in a ``peft.PeftModel`` with every adapter; returns (model, summaries, notes).

    peft's ``save_pretrained`` writes each adapter config's ``base_model_name_or_path`` and
    ``revision`` as they were read; an adapter whose base was relative (``../base``) saved into
    another folder would name a base that is not there. They are set to the base this load used
    (:func:`reloadable_base`), and the notes say so where that changed them.
    """
    from peft import PeftModel

    first, rest = adapters[0], adapters[1:]
    with _peft_errors(first), without_unused_gptqmodel():
        peft_model = PeftModel.from_pretrained(model, str(first.source.path), adapter_name=first.name,
                                               is_trainable=request.trainable)
    for adapter in rest:
        with _peft_errors(adapter), without_unused_gptqmodel():
            peft_model.load_adapter(str(adapter.source.path), adapter_name=adapter.name,
                                    is_trainable=request.trainable)
    active = request.active_adapter or first.name
    if active not in {a.name for a in adapters}:
        raise AdapterError(f"active_adapter {active!r} is not one of the loaded adapters.", field="active_adapter",
                           expected=", ".join(a.name for a in adapters), found=active,
                           fix="pass the name of a loaded adapter")
    peft_model.set_adapter(active)
    # set_adapter makes the active adapter trainable; decide explicitly instead.
    names = [a.name for a in adapters]
    for pname, param in peft_model.named_parameters():
        owner = next((n for n in names if f".{n}." in f".{pname}."), None)
        param.requires_grad = bool(request.trainable and owner == active)
    base_ref, base_revision = reloadable_base(base)
    notes = []
    for adapter in adapters:
        config = peft_model.peft_config[adapter.name]
        was = (config.base_model_name_or_path, config.revision)
        config.base_model_name_or_path, config.revision = base_ref, base_revision
        if was != (base_ref, base_revision):
            notes.append(f"adapter {adapter.name!r}: base_model_name_or_path set to {base_ref!r}"
                         + (f" at revision {base_revision}" if base_revision else "")
                         + f" (adapter_config.json: {was[0]!r}"
                         + (f" at {was[1]}" if was[1] else "") + "), the base this load used, so that "
                         "save_pretrained writes a base that reloads from any folder")
    summaries = [{"name": a.name, "peft_type": a.peft_type, "r": a.config.get("r"),
                  "trainable": bool(request.trainable and a.name == active), "active": a.name == active,
                  "path": str(a.source.path), "base_model_name_or_path": base_ref, "revision": base_revision}
                 for a in adapters]
    return peft_model, summaries, notes
