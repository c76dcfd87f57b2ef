"""Does each adapter's config agree with its tensors? Decided at plan time, with peft itself, on the
meta device.

peft builds an adapter's layers from ``adapter_config.json`` (``r``, ``target_modules``,
``rank_pattern`` ...) and then loads the saved tensors into them. Where the two disagree it does
not refuse: tensors of modules the config does not target, or with leaf names it does not know
(``lora_C``), are dropped with a warning at most; modules the config targets but the file has no
tensors for keep their fresh initialisation (``lora_B`` = 0: the adapter silently does less than
it was trained to do); a rank that disagrees with the tensors ends in a raw ``RuntimeError``.

:func:`check_adapters_fit` replays what ``stages.adapters.attach_adapters`` will do (peft's own
config reader, ``PeftModel`` class, ``add_adapter`` and ``set_peft_model_state_dict``) on the plan's
meta-device skeleton, fed with meta tensors shaped as the adapter's safetensors header says. No
weight is read and nothing is allocated; whatever peft would refuse, drop or leave untrained is an
:class:`~loadstone.AdapterError` before the load starts.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Iterator

from ..contract.errors import AdapterError
from ..contract.request import LoadRequest
from ..contract.sources import ADAPTER_CONFIG, AdapterSource
from ..safetensors_header import TORCH_DTYPE_NAMES, read_safetensors_header
from .peft_support import without_unused_gptqmodel

_SHOW = 6
_FLOAT_CODES = {"F16", "BF16", "F32", "F64"}


def _listing(names: Any) -> str:
    names = sorted(names)
    return ", ".join(names[:_SHOW]) + (f" ... ({len(names) - _SHOW} more)" if len(names) > _SHOW else "")


@contextlib.contextmanager
def _quiet_meta() -> Iterator[None]:
    """peft on the meta device, without its warnings; one model build at a time (see faults.py)."""
    import torch

    from ..faults import TRANSFORMERS_GLOBAL_STATE

    with TRANSFORMERS_GLOBAL_STATE, torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _peft_refuses(adapter: AdapterSource, exc: BaseException, doing: str) -> AdapterError:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return AdapterError(f"adapter {adapter.name!r}: peft refuses it while {doing}: {type(exc).__name__}.",
                        file=adapter.source.path / ADAPTER_CONFIG, field="(adapter config)",
                        expected="a configuration peft can build the adapter from",
                        found=(lines[0] if lines else type(exc).__name__)[:300],
                        fix="re-save the adapter with peft's save_pretrained, or fix the field the message names")


def _no_saved_copy(adapter: AdapterSource, config: Any, exc: KeyError) -> AdapterError:
    """peft looks up a saved copy of each module it keeps whole (``modules_to_save``, and a task's
    head such as ``score`` for SEQ_CLS) and raises a bare ``KeyError`` where there is none."""
    key = str(exc.args[0]) if exc.args else "?"
    saved = sorted(getattr(config, "modules_to_save", None) or [])
    return AdapterError(
        f"adapter {adapter.name!r} keeps whole copies of {', '.join(saved) or 'its task head'}, but "
        f"{adapter.weights.name} holds no saved copy: {key}.", file=adapter.weights,
        field="modules_to_save" if saved else "task_type", expected=f"{key} in {adapter.weights.name}",
        found="no such tensor",
        fix="re-save the adapter with peft's save_pretrained after training those modules, or drop them from "
            "modules_to_save (and check task_type) in adapter_config.json")


def _meta_state(adapter: AdapterSource) -> tuple[dict[str, Any], dict[str, str]]:
    """The adapter's tensors as meta tensors of the stored shapes and dtypes, and their dtype codes
    (from the safetensors header, or from a pickle read onto the meta device: no data either way)."""
    import torch

    if adapter.weights.suffix == ".safetensors":
        infos, _ = read_safetensors_header(adapter.weights)
    else:  # allow_pickle was given (validate_adapter refuses it otherwise)
        from .inspect.checkpoint import read_pickle_tensors

        infos = read_pickle_tensors(adapter.weights)
    state = {}
    for name, info in infos.items():
        dtype = getattr(torch, TORCH_DTYPE_NAMES.get(info.dtype, "uint8"), torch.uint8)
        state[name] = torch.empty(info.shape, dtype=dtype, device="meta")
    return state, {name: info.dtype for name, info in infos.items()}


def check_adapters_fit(skeleton: Any, adapters: list[AdapterSource], request: LoadRequest) -> None:
    """Raise :class:`~loadstone.AdapterError` unless every adapter loads into ``skeleton`` exactly
    as saved. peft wraps ``skeleton``: pass one nothing else uses."""
    if not adapters:
        return
    from peft import MODEL_TYPE_TO_PEFT_MODEL_MAPPING, PeftModel
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    model = skeleton
    for index, adapter in enumerate(adapters):
        with _quiet_meta():
            try:
                config = PEFT_TYPE_TO_CONFIG_MAPPING[adapter.peft_type].from_pretrained(str(adapter.source.path))
            except Exception as exc:  # noqa: BLE001 - peft's own validation of the file (__post_init__)
                raise _peft_refuses(adapter, exc, "reading adapter_config.json") from exc
            if config.is_prompt_learning and request.trainable:
                raise AdapterError(
                    f"adapter {adapter.name!r} is a prompt-learning adapter ({config.peft_type}), which peft loads "
                    f"only frozen.", file=adapter.source.path / ADAPTER_CONFIG, field="peft_type",
                    expected="a trainable load of a LoRA-style adapter, or a frozen load", found=str(config.peft_type),
                    fix="load it frozen: trainable=False (CLI: --frozen)")
            config.inference_mode = not request.trainable
            if isinstance(getattr(config, "init_lora_weights", None), str):
                config.init_lora_weights = True  # same layers and shapes, without an initialiser that reads weights
            try:
                with without_unused_gptqmodel():
                    if index == 0:
                        peft_class = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(config.task_type, PeftModel)
                        model = peft_class(skeleton, config, adapter.name)
                    else:
                        model.add_adapter(adapter.name, config)
                expected = get_peft_model_state_dict(model, adapter_name=adapter.name)
            except Exception as exc:  # noqa: BLE001 - what peft raises building layers from this config
                raise _peft_refuses(adapter, exc, "building its layers on the base model") from exc
            state, codes = _meta_state(adapter)
            _check_shapes_and_dtypes(adapter, config, state, codes, expected)
            try:
                result = set_peft_model_state_dict(model, state, adapter_name=adapter.name)
            except KeyError as exc:  # a module peft keeps a whole copy of, which the weights do not hold
                raise _no_saved_copy(adapter, config, exc) from exc
            except Exception as exc:  # noqa: BLE001
                raise _peft_refuses(adapter, exc, "loading its tensors") from exc
        prefix = PEFT_TYPE_TO_PREFIX_MAPPING.get(config.peft_type, "")
        # peft's own filter for an adapter's missing keys, by whole name components
        missing = {k for k in result.missing_keys if prefix in k and f".{adapter.name}." in f".{k}."}
        # Keys peft saves for this config are its own, even where it loads them outside load_state_dict
        # (prompt embeddings), which then reports them as unexpected.
        _check_accounted(adapter, model, set(result.unexpected_keys) - set(expected), missing)


def _check_shapes_and_dtypes(adapter: AdapterSource, config: Any, state: dict[str, Any], codes: dict[str, str],
                             expected: dict[str, Any]) -> None:
    mismatched = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in expected.items()
                  if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if mismatched:
        ranks = sorted({shape[0] for k, shape, _ in mismatched if ".lora_A." in k and shape})
        declared = getattr(config, "r", None)
        if ranks and declared is not None and not getattr(config, "rank_pattern", None) and declared not in ranks:
            raise AdapterError(
                f"adapter {adapter.name!r}: adapter_config.json says r={declared}, but its LoRA tensors have rank "
                f"{', '.join(map(str, ranks))}.", file=adapter.source.path / ADAPTER_CONFIG, field="r",
                expected=f"r = {', '.join(map(str, ranks))} (the first dimension of lora_A)", found=f"r = {declared}",
                fix="write the rank the adapter was trained with into adapter_config.json (or re-save the adapter)")
        raise AdapterError(
            f"adapter {adapter.name!r}: {len(mismatched)} tensors of {adapter.weights.name} do not have the shape "
            f"adapter_config.json gives them.", file=adapter.weights, field="tensor shapes",
            expected="the shapes peft builds from r, rank_pattern and the base model's layers",
            found="; ".join(f"{k} is {list(f)}, expected {list(e)}" for k, f, e in mismatched[:_SHOW]),
            fix="check r, rank_pattern and target_modules in adapter_config.json against the tensors (or re-save "
                "the adapter)")
    wrong = [(k, codes[k]) for k in state if codes[k] not in _FLOAT_CODES
             and (k not in expected or expected[k].is_floating_point())]
    if wrong:
        raise AdapterError(
            f"adapter {adapter.name!r}: {len(wrong)} tensors of {adapter.weights.name} are not floating point, and "
            f"peft would cast them into floating weights silently.", file=adapter.weights, field="tensor dtypes",
            expected="F16, BF16, F32 or F64", found="; ".join(f"{k} is {d}" for k, d in wrong[:_SHOW]),
            fix="re-save the adapter from its trained (floating point) weights")


def _check_accounted(adapter: AdapterSource, model: Any, unexpected: set[str], missing: set[str]) -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    if unexpected:
        # modules peft gave this adapter's layers to (an earlier adapter may have wrapped others)
        wrapped = {name for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)
                   and any(adapter.name in (getattr(module, layer, None) or {})
                           for layer in getattr(module, "adapter_layer_names", ()))}

        def owner_wrapped(key: str) -> bool:
            parts = key.split(".")
            return any(".".join(parts[:i]) in wrapped for i in range(len(parts) - 1, 0, -1))

        untargeted = {k for k in unexpected if not owner_wrapped(k)}
        unknown = unexpected - untargeted
        if untargeted:
            raise AdapterError(
                f"adapter {adapter.name!r}: {len(untargeted)} tensors of {adapter.weights.name} belong to modules "
                f"adapter_config.json does not target; peft would drop them silently.",
                file=adapter.source.path / ADAPTER_CONFIG, field="target_modules",
                expected="target_modules naming every module the adapter has weights for", found=_listing(untargeted),
                fix="add those modules to target_modules (or re-save the adapter with peft's save_pretrained)")
        raise AdapterError(
            f"adapter {adapter.name!r}: {len(unknown)} tensors of {adapter.weights.name} are not weights a "
            f"{adapter.peft_type} adapter has; peft would drop them silently.", file=adapter.weights,
            field="tensor names", expected=f"the weights peft's {adapter.peft_type} layers define (e.g. lora_A, lora_B)",
            found=_listing(unknown), fix="re-save the adapter with peft's save_pretrained; the file holds extra tensors")
    if missing:
        raise AdapterError(
            f"adapter {adapter.name!r}: adapter_config.json targets modules {adapter.weights.name} has no weights "
            f"for; peft would leave them freshly initialised, so the adapter would not be the one that was trained.",
            file=adapter.source.path / ADAPTER_CONFIG, field="target_modules",
            expected="tensors for every module target_modules names", found=_listing(missing),
            fix="remove those modules from target_modules, or use the complete adapter weights")
