"""The ``transformers`` engine: ``AutoModel*.from_pretrained`` with the plan's exact choices
(device map, dtype, quantization config), then transformers' loading info checked strictly.

It runs every plan transformers can: pickle checkpoints (``allow_pickle``), disk offload, and
quantization backends that only offer a ``transformers_config``. It cannot run a backend that
converts weights only itself, nor a pre-quantized format transformers does not know (it would
load the packed tensors as plain weights).
"""

from __future__ import annotations

import contextlib
import copy
import errno
import re
from typing import Any, Iterator

from ..contract.engines import Engine, EngineContext
from ..contract.errors import LoadstoneError, PlacementError, WeightsMismatchError
from ..contract.plan import Plan
from ..contract.units import format_size


@contextlib.contextmanager
def transformers_progress(enabled: bool) -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if was_enabled else hf_logging.disable_progress_bar)()


class TransformersEngine(Engine):
    name = "transformers"
    preference = 900
    description = "transformers' from_pretrained with the plan's device map, dtype and quantization config"

    def problems(self, plan: Plan) -> list[str]:
        qctx = plan.quantization
        backend = plan.quantization_backend
        converted = plan.tensor_map.converted if plan.tensor_map is not None else frozenset()
        if not qctx.pre_quantized and converted and plan.quantization_config is None:
            return [f"quantization backend {backend.name!r} converts weights only itself (load_tensor), which "
                    f"from_pretrained cannot call"]
        if qctx.pre_quantized:
            from transformers.quantizers.auto import AutoQuantizationConfig

            method = str((qctx.checkpoint_config or {}).get("quant_method", "")).lower()
            try:  # transformers' own resolution of a checkpoint's quantization_config
                AutoQuantizationConfig.from_dict(dict(qctx.checkpoint_config or {}))
            except (ValueError, KeyError, TypeError):
                return [f"transformers does not know the pre-quantized format {method!r} (it would load the "
                        f"packed tensors as plain weights)"]
        return []

    def kwargs(self, plan: Plan) -> dict[str, Any]:
        request = plan.request
        kwargs: dict[str, Any] = {
            "config": copy.deepcopy(plan.config),
            "dtype": plan.torch_dtype,
            "device_map": dict(plan.device_map),
            "local_files_only": True,
            "trust_remote_code": request.trust_remote_code,
            "use_safetensors": plan.inventory.format == "safetensors",
            "weights_only": True,
            "output_loading_info": True,
        }
        if plan.quantization_config is not None:
            kwargs["quantization_config"] = plan.quantization_config
        if request.offload_folder:
            kwargs["offload_folder"] = request.offload_folder
        if request.attn_implementation:
            kwargs["attn_implementation"] = request.attn_implementation
        return kwargs

    def load(self, plan: Plan, ctx: EngineContext) -> Any:
        from ..faults import TRANSFORMERS_GLOBAL_STATE

        kwargs = self.kwargs(plan)
        # The lock: from_pretrained patches process-wide state (see faults.py).
        with TRANSFORMERS_GLOBAL_STATE, transformers_progress(ctx.progress):
            try:
                model, info = plan.auto_class.from_pretrained(str(plan.sources.base.path), **kwargs)
            except LoadstoneError:
                raise
            except RuntimeError as exc:
                if "size mismatch" in str(exc) or "shape" in str(exc).lower():
                    raise WeightsMismatchError(
                        f"the checkpoint's tensors do not fit the model: {exc}", file=plan.sources.base.path,
                        field="tensor shapes", fix="check that config.json belongs to these weights") from exc
                raise offload_write_error(exc, plan) or exc
            except Exception as exc:
                raise offload_write_error(exc, plan) or exc
        check_loading_info(info, plan)
        return model


# errno values of a write that failed for lack of room (or a file size limit): ENOSPC, EFBIG, EDQUOT
_NO_ROOM = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}


def offload_write_error(exc: BaseException, plan: Plan) -> PlacementError | None:
    """A failed write into the offload folder (disk full, quota, file size limit), from
    ``from_pretrained`` re-saving offloaded tensors, as a :class:`PlacementError`; ``None`` for
    anything else. The pipeline removes what the load wrote before the error reaches the caller."""
    folder = plan.request.offload_folder
    if not folder or "disk" not in {str(d) for d in plan.device_map.values()}:
        return None
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        reason = None
        if isinstance(exc, OSError) and exc.errno in _NO_ROOM:
            reason = exc.strerror or str(exc)
        elif type(exc).__name__ == "SafetensorError" and "serializ" in str(exc):  # safetensors' save_file
            reason = re.sub(r"^.*I/O error: ", "", str(exc))
        if reason:
            offloaded = plan.bytes_per_device.get("disk", 0)
            return PlacementError(
                f"writing offloaded weights into {folder} failed: {reason}; nothing the load wrote was kept.",
                file=folder, field="offload_folder", expected=f"room for up to {format_size(offloaded)} (what the "
                "plan sends to disk)", found=reason, fix="free space there, pass another offload_folder on a larger "
                "disk, or raise max_memory['cpu'] so that fewer tensors go to disk")
        exc = exc.__cause__ or exc.__context__
    return None


def check_loading_info(info: dict[str, Any], plan: Plan) -> None:
    """Missing, unexpected or mismatched tensors are errors, never random weights."""
    missing = sorted(info.get("missing_keys") or [])
    unexpected = sorted(info.get("unexpected_keys") or [])
    mismatched = sorted(str(m) for m in (info.get("mismatched_keys") or []))
    # A new task head (score.weight for a causal-LM checkpoint loaded for classification) is expected;
    # the plan stage already reported it (see stages/plan/tensormap.head_keys).
    if missing or unexpected:
        from ..stages.plan.tensormap import head_keys

        head = head_keys(plan.build_skeleton(), plan.config, missing + unexpected)
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
    arch = plan.config.architectures[0] if getattr(plan.config, "architectures", None) else "the model"
    raise WeightsMismatchError(
        f"the checkpoint does not match {arch}: " + "; ".join(parts) + ".", file=plan.sources.base.path,
        field="tensor names", expected="exactly the tensors the architecture in config.json defines (tied weights "
        "excepted)", found="; ".join(parts), fix="check that config.json and the weights belong together (same "
        "model size and type), or re-save the checkpoint")
