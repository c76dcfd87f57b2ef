"""Stage 4: read the weights into the planned layout.

This is a seam: :class:`TransformersWeightLoader` hands the plan's exact choices (device map,
dtype, quantization config) to ``from_pretrained``. A streaming loader can replace it without
touching planning, adapters or the report.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Protocol

from .errors import LoadstoneError, WeightsMismatchError


class WeightLoader(Protocol):
    name: str

    def load(self, plan: Any) -> Any:
        """Return the base ``PreTrainedModel`` with weights placed as ``plan.device_map`` says."""


@contextlib.contextmanager
def transformers_progress(enabled: bool) -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if was_enabled else hf_logging.disable_progress_bar)()


class TransformersWeightLoader:
    """Delegates to ``AutoModel*.from_pretrained`` with the kwargs the plugins chose."""

    name = "transformers.from_pretrained"

    def __init__(self, progress: bool = False):
        self.progress = progress

    def kwargs(self, plan: Any) -> dict[str, Any]:
        request = plan.request
        quant_config = plan.quantization_config
        kwargs: dict[str, Any] = {
            "config": plan.config,
            "dtype": plan.torch_dtype,
            "device_map": dict(plan.device_map),
            "local_files_only": True,
            "trust_remote_code": request.trust_remote_code,
            "use_safetensors": plan.inventory.format == "safetensors",
            "weights_only": True,
            "output_loading_info": True,
        }
        if quant_config is not None:
            kwargs["quantization_config"] = quant_config
        if request.offload_folder:
            kwargs["offload_folder"] = request.offload_folder
        if request.attn_implementation:
            kwargs["attn_implementation"] = request.attn_implementation
        return kwargs

    def load(self, plan: Any) -> Any:
        import copy

        kwargs = self.kwargs(plan)
        kwargs["config"] = copy.deepcopy(plan.config)
        from .faults import TRANSFORMERS_GLOBAL_STATE

        # The lock: from_pretrained patches process-wide state (see faults.py).
        with TRANSFORMERS_GLOBAL_STATE, transformers_progress(self.progress):
            try:
                model, info = plan.auto_class.from_pretrained(str(plan.sources.base.path), **kwargs)
            except LoadstoneError:
                raise
            except RuntimeError as exc:
                if "size mismatch" in str(exc) or "shape" in str(exc).lower():
                    raise WeightsMismatchError(
                        f"the checkpoint's tensors do not fit {type(plan.skeleton).__name__}: {exc}",
                        file=plan.sources.base.path, field="tensor shapes",
                        fix="check that config.json belongs to these weights") from exc
                raise
        check_loading_info(info, plan)
        return model


def check_loading_info(info: dict[str, Any], plan: Any) -> None:
    """Missing, unexpected or mismatched tensors are errors, never random weights."""
    missing = sorted(info.get("missing_keys") or [])
    unexpected = sorted(info.get("unexpected_keys") or [])
    mismatched = sorted(str(m) for m in (info.get("mismatched_keys") or []))
    # A new task head (score.weight for a causal-LM checkpoint loaded for classification) is expected;
    # the plan stage already reported it (see validation.head_keys).
    if getattr(plan, "skeleton", None) is not None:
        from .validation import head_keys

        head = head_keys(plan.skeleton, plan.config, missing + unexpected)
        missing, unexpected = [k for k in missing if k not in head], [k for k in unexpected if k not in head]
    if not (missing or unexpected or mismatched):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (would be randomly initialised): {', '.join(missing[:8])}"
                     + (" ..." if len(missing) > 8 else ""))
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected: {', '.join(unexpected[:8])}" + (" ..." if len(unexpected) > 8 else ""))
    if mismatched:
        parts.append(f"{len(mismatched)} with the wrong shape: {', '.join(mismatched[:8])}")
    raise WeightsMismatchError(
        f"the checkpoint does not match {plan.config.architectures[0] if getattr(plan.config, 'architectures', None) else 'the model'}: "
        + "; ".join(parts) + ".", file=plan.sources.base.path, field="tensor names",
        expected="exactly the tensors the architecture in config.json defines (tied weights excepted)",
        found="; ".join(parts), fix="check that config.json and the weights belong together (same model size "
        "and type), or re-save the checkpoint")
