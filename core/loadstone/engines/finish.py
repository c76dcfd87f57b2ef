"""What every engine calls last: transformers' own finishing steps on a model whose tensors it
has loaded (:func:`finish_loading`, public as ``loadstone.finish_loading``); and what an engine
may call first, on the skeleton, so that most of those steps run before the first tensor arrives
(:func:`start_finishing`, public as ``loadstone.start_finishing``)."""

from __future__ import annotations

import threading
import weakref
from typing import Any

from ..contract.plan import Plan

# Skeletons start_finishing has finished but for the tying; finish_loading takes them out.
_STARTED: weakref.WeakSet = weakref.WeakSet()
_STARTED_LOCK = threading.Lock()


def start_finishing(model: Any, plan: Plan) -> None:
    """Run transformers' finishing steps that need no loaded tensor on the skeleton, before an
    engine loads any: the non-persistent buffers (rotary frequencies) computed on their planned
    devices, a new task head initialised, eval mode. :func:`finish_loading` then only ties the
    tied weights (and dispatches a map over several devices). Optional: an engine whose readers
    read while it builds the model (the native engine's read-ahead) takes these steps off the end
    of its load. Call it after ``backend.convert_skeleton``, with the plan's tensor map."""
    mark_loaded(model, set(), filled=plan.tensor_map.targets())  # a fresh tensor is never one of them
    _finalize(model, plan)
    model.eval()
    with _STARTED_LOCK:
        _STARTED.add(model)


def finish_loading(model: Any, plan: Plan) -> None:
    """Finish a model whose every mapped tensor an engine has loaded: transformers' own steps after
    its loading loop (tie weights, compute the non-persistent buffers such as rotary frequencies on
    their planned devices, initialise a new task head; called as ``from_pretrained`` calls them),
    eval mode, then accelerate's dispatch hooks for a map over several devices. Public: engine
    authors call it last in :meth:`Engine.load`. After :func:`start_finishing` on this model, only
    the tying is left to do."""
    with _STARTED_LOCK:
        started = model in _STARTED
        _STARTED.discard(model)
    if started:
        from ..faults import TRANSFORMERS_GLOBAL_STATE

        # The skeleton's tied copies were tied to tensors that loading has since replaced.
        with TRANSFORMERS_GLOBAL_STATE:
            model.tie_weights(missing_keys=_missing(plan), recompute_mapping=False)
    else:
        mark_loaded(model, set(plan.tensor_map.fresh))
        _finalize(model, plan)
    if any(module.training for module in model.modules()):  # an engine may have switched it early
        model.eval()
    devices = {str(d) for d in plan.device_map.values()}
    if len(devices) > 1:
        from transformers.integrations.accelerate import accelerate_dispatch

        accelerate_dispatch(model, getattr(model, "hf_quantizer", None), dict(plan.device_map), None, None, False)


def _missing(plan: Plan) -> set[str]:
    """What the map does not fill: tied copies (tied again) and a new task head (initialised)."""
    return set(plan.tensor_map.tied) | set(plan.tensor_map.fresh)


def _finalize(model: Any, plan: Plan) -> None:
    from transformers.modeling_utils import LoadStateDictConfig, PreTrainedModel
    from transformers.utils.loading_report import LoadStateDictInfo

    from ..faults import TRANSFORMERS_GLOBAL_STATE

    info = LoadStateDictInfo(missing_keys=_missing(plan), unexpected_keys=set(), mismatched_keys=set(),
                             error_msgs=[], conversion_errors={}, skipped_pp_keys=set())
    config = LoadStateDictConfig(pretrained_model_name_or_path=str(plan.sources.base.path),
                                 device_map=dict(plan.device_map), dtype=plan.torch_dtype)
    with TRANSFORMERS_GLOBAL_STATE:
        PreTrainedModel._finalize_model_loading(model, config, info)


def mark_loaded(model: Any, fresh: set[str], filled: set[str] | None = None) -> None:
    """transformers' marker, ``_is_hf_initialized``, on every loaded tensor (its own loader sets it
    as it assigns each one), so that the model's initialiser leaves them alone, quantized ones
    included; and on every module whose whole subtree is loaded, so that the initialiser does not
    call ``_init_weights`` on it at all (a third of the finishing time of a 32-layer Llama). A
    module keeps its call where anything below it is not loaded: a non-persistent buffer such as
    rotary frequencies (computed there), or a tensor in ``fresh`` (a new task head).

    Loaded means off the meta device and not fresh; on a skeleton (``filled`` given, the names the
    plan's tensor map fills), it means about to be loaded: one of ``filled``."""
    loaded: dict[int, bool] = {}
    # named_modules lists each parent before its children: reversed, every subtree comes first
    for prefix, module in reversed(list(model.named_modules())):
        whole = all(loaded.get(id(child), False) for child in module._modules.values() if child is not None)
        for group in (module._parameters, module._buffers):
            for leaf, tensor in group.items():
                if tensor is None:
                    continue
                name = f"{prefix}.{leaf}" if prefix else leaf
                is_loaded = (name in filled) if filled is not None else (not tensor.is_meta and name not in fresh)
                if is_loaded:
                    tensor._is_hf_initialized = True
                else:
                    whole = False
        loaded[id(module)] = whole
        if whole:
            module._is_hf_initialized = True
