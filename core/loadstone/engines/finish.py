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
    # transformers' marker on every loaded tensor (its own loader sets it as it assigns each one):
    # the model's initialiser then leaves them alone, quantized ones included.
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.device.type != "meta" and name not in fresh:
            tensor._is_hf_initialized = True
    info = LoadStateDictInfo(missing_keys=missing, unexpected_keys=set(), mismatched_keys=set(), error_msgs=[],
                             conversion_errors={}, skipped_pp_keys=set())
    config = LoadStateDictConfig(pretrained_model_name_or_path=str(plan.sources.base.path),
                                 device_map=dict(plan.device_map), dtype=plan.torch_dtype)
    with TRANSFORMERS_GLOBAL_STATE:
        PreTrainedModel._finalize_model_loading(model, config, info)
    model.eval()
    devices = {str(d) for d in plan.device_map.values()}
    if len(devices) > 1:
        from transformers.integrations.accelerate import accelerate_dispatch

        accelerate_dispatch(model, getattr(model, "hf_quantizer", None), dict(plan.device_map), None, None, False)
