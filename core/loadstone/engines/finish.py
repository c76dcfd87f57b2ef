"""What every engine calls last: transformers' own finishing steps on a model whose tensors it
has loaded (:func:`finish_loading`, public as ``loadstone.finish_loading``)."""

from __future__ import annotations

from typing import Any

from ..contract.plan import Plan


def finish_loading(model: Any, plan: Plan) -> None:
    """Finish a model whose every mapped tensor an engine has loaded: transformers' own steps after
    its loading loop (tie weights, compute the non-persistent buffers such as rotary frequencies on
    their planned devices, initialise a new task head; called as ``from_pretrained`` calls them),
    eval mode, then accelerate's dispatch hooks for a map over several devices. Public: engine
    authors call it last in :meth:`Engine.load`."""
    from transformers.modeling_utils import LoadStateDictConfig, PreTrainedModel
    from transformers.utils.loading_report import LoadStateDictInfo

    from ..faults import TRANSFORMERS_GLOBAL_STATE

    # What the map does not fill: tied copies (tied again) and a new task head (initialised).
    fresh = set(plan.tensor_map.fresh)
    missing = set(plan.tensor_map.tied) | fresh
    mark_loaded(model, fresh)
    info = LoadStateDictInfo(missing_keys=missing, unexpected_keys=set(), mismatched_keys=set(), error_msgs=[],
                             conversion_errors={}, skipped_pp_keys=set())
    config = LoadStateDictConfig(pretrained_model_name_or_path=str(plan.sources.base.path),
                                 device_map=dict(plan.device_map), dtype=plan.torch_dtype)
    with TRANSFORMERS_GLOBAL_STATE:
        PreTrainedModel._finalize_model_loading(model, config, info)
    if any(module.training for module in model.modules()):  # an engine may have switched it early
        model.eval()
    devices = {str(d) for d in plan.device_map.values()}
    if len(devices) > 1:
        from transformers.integrations.accelerate import accelerate_dispatch

        accelerate_dispatch(model, getattr(model, "hf_quantizer", None), dict(plan.device_map), None, None, False)


def mark_loaded(model: Any, fresh: set[str]) -> None:
    """transformers' marker, ``_is_hf_initialized``, on every loaded tensor (its own loader sets it
    as it assigns each one), so that the model's initialiser leaves them alone, quantized ones
    included; and on every module whose whole subtree is loaded, so that the initialiser does not
    call ``_init_weights`` on it at all (a third of the finishing time of a 32-layer Llama). A
    module keeps its call where anything below it is still on the meta device (a non-persistent
    buffer such as rotary frequencies, computed there) or is in ``fresh`` (a new task head)."""
    loaded: dict[int, bool] = {}
    # named_modules lists each parent before its children: reversed, every subtree comes first
    for prefix, module in reversed(list(model.named_modules())):
        whole = all(loaded.get(id(child), False) for child in module._modules.values() if child is not None)
        for group in (module._parameters, module._buffers):
            for leaf, tensor in group.items():
                if tensor is None:
                    continue
                if tensor.is_meta or (fresh and (f"{prefix}.{leaf}" if prefix else leaf) in fresh):
                    whole = False
                else:
                    tensor._is_hf_initialized = True
        loaded[id(module)] = whole
        if whole:
            module._is_hf_initialized = True
