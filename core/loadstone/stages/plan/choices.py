"""The plan stage's decisions about the model itself: task and Auto class, dtype, and which
quantization backend loads it with which options."""

from __future__ import annotations

import inspect
import json
import warnings
from pathlib import Path
from typing import Any

from ...contract.checkpoint import CheckpointInventory
from ...contract.errors import ComponentNotFoundError, ConfigError, QuantizationError
from ...contract.quantization import QuantizationBackend, QuantizationContext
from ...contract.records import Registration
from ...contract.report import Decision
from ...contract.request import PEFT_TASKS, TASKS, LoadRequest
from ...contract.sources import Sources
from ...plugin_policy import KNOWN_QUANTIZATION_FILES
from ...plugins import PluginManager
from ..inspect import CONFIG, read_raw_config


def choose_task(request: LoadRequest, sources: Sources) -> tuple[str, Decision]:
    if request.task:
        return request.task, Decision("task", request.task, "user")
    for adapter in sources.adapters:
        peft_task = adapter.config.get("task_type")
        if peft_task in PEFT_TASKS:
            task = PEFT_TASKS[peft_task]
            return task, Decision("task", task, "kernel", f"adapter {adapter.name!r} task_type {peft_task}")
    return "causal-lm", Decision("task", "causal-lm", "kernel", "default")


def task_asked(decision: Decision) -> bool:
    """Whether :func:`choose_task`'s task was asked for (by the user or an adapter), not defaulted."""
    return not (decision.by == "kernel" and decision.reason == "default")


def auto_class_for(task: str, config: Any, folder: Path) -> Any:
    import transformers

    name = TASKS[task]
    cls = getattr(transformers, name)
    if name != "AutoModel" and type(config) not in cls._model_mapping:
        supported = [t for t, n in TASKS.items() if type(config) in getattr(transformers, n)._model_mapping]
        raise ConfigError(
            f"{type(config).__name__} ({config.model_type}) has no {name} head in transformers.",
            file=folder / CONFIG, field="model_type", expected=f"a model with a {task} head",
            found=config.model_type, fix=f"pass task= one of: {', '.join(supported) or 'feature-extraction'}")
    return cls


def choose_dtype(request: LoadRequest, config: Any, inventory: CheckpointInventory) -> tuple[str, Decision]:
    if request.dtype != "auto":
        return request.dtype, Decision("dtype", request.dtype, "user")
    declared = getattr(config, "dtype", None)
    declared = str(declared).replace("torch.", "") if declared is not None else None
    if declared in {"bfloat16", "float16", "float32"}:
        return declared, Decision("dtype", declared, "kernel", "config.json dtype (checkpoint's own)")
    stored = inventory.dominant_float_dtype()
    if stored in {"bfloat16", "float16", "float32"}:
        return stored, Decision("dtype", stored, "kernel", "dtype of most bytes in the safetensors headers")
    wider = next((d for d in (declared, stored) if d == "float64"), None)
    if wider:  # the report says why the weights are cast, rather than that nothing was declared
        return "float32", Decision("dtype", "float32", "kernel", "the checkpoint is float64, which loads as float32 "
                                   "(the widest load dtype; pass dtype= to choose another)")
    return "float32", Decision("dtype", "float32", "kernel", "checkpoint declares no dtype")


def checkpoint_quantization(config: Any, plugins: PluginManager, folder: Path) -> tuple[dict | None, str]:
    """The checkpoint's quantization config and where it was found: ``config.json``, or a file of a
    backend's own format (``read_checkpoint_config``), which is then written into ``config`` so that
    every engine sees a pre-quantized checkpoint."""
    qconfig = getattr(config, "quantization_config", None)
    if qconfig is not None and not isinstance(qconfig, dict):
        qconfig = qconfig.to_dict()
    if qconfig:
        return qconfig, "config.json"
    raw: dict[str, Any] | None = None
    for reg in plugins.components("quantization"):
        if type(reg.component).read_checkpoint_config is QuantizationBackend.read_checkpoint_config:
            continue  # the base class's default: nothing to read, and no need to parse config.json again
        raw = read_raw_config(folder) if raw is None else raw
        with plugins.guard(reg, "plan", "read_checkpoint_config"):
            found = reg.component.read_checkpoint_config(folder, raw)
        if found:
            config.quantization_config = dict(found)
            return dict(found), f"{reg.name} ({reg.owner()}) read it from the checkpoint's own files"
    for name, quant_method in KNOWN_QUANTIZATION_FILES.items():
        if (folder / name).is_file():  # no installed backend read it: refuse it, never plain weights
            try:
                quant_method = str(json.loads((folder / name).read_text()).get("quant_method") or quant_method)
            except (OSError, ValueError, AttributeError):
                pass  # unreadable: the file's name says enough
            raise ComponentNotFoundError(
                f"{folder / name} says the checkpoint is pre-quantized ({quant_method}), and no installed plugin "
                f"reads it (loading it as plain weights would be silently wrong).", file=folder / name,
                field=name, found=quant_method, fix=plugins.missing_checkpoint_backend(quant_method).fix)
    return None, ""


def choose_quantization(request: LoadRequest, config: Any, plugins: PluginManager,
                        folder: Any, loading: bool = True) -> tuple[Registration, QuantizationContext, Decision]:
    qconfig, where = checkpoint_quantization(config, plugins, Path(folder))
    if qconfig:
        quant_method = str(qconfig.get("quant_method", "")).lower() or "<missing>"
        reg = plugins.backend_for_checkpoint(qconfig)
        if reg is None:
            error = plugins.missing_checkpoint_backend(quant_method)
            raise ComponentNotFoundError(
                f"{folder}/config.json says the checkpoint is pre-quantized with {quant_method!r}, and no installed "
                f"plugin loads that format (loading it as plain weights would be silently wrong).",
                file=f"{folder}/config.json", field="quantization_config.quant_method", found=quant_method,
                fix=error.fix) from None
        with plugins.guard(reg, "plan", "checkpoint_method"):
            method = reg.component.checkpoint_method(qconfig)
        if request.quantization not in (None, method):
            raise QuantizationError(
                f"the checkpoint is already quantized ({method}, {quant_method}); it cannot be re-quantized "
                f"as {request.quantization!r}.", file=f"{folder}/config.json", field="quantization",
                expected=f"no quantization argument, or {method!r}", found=request.quantization,
                fix="drop the quantization argument to load it as it is, or load the original unquantized checkpoint")
        _check_environment(reg, method, plugins)
        ctx = QuantizationContext(method, {}, qconfig, config, request=request, loading=loading)
        ctx.options = normalize_options(reg, method, request.quantization_options, ctx, plugins)
        reason = f"pre-quantized checkpoint ({quant_method}" + (f"; {where})" if where != "config.json" else ")")
        return reg, ctx, Decision.from_registration("quantization", method, reg, reason)
    method = request.quantization or "none"
    reg = plugins.quantization_backend(method)
    _check_environment(reg, method, plugins)
    ctx = QuantizationContext(method, {}, None, config, request=request, loading=loading)
    ctx.options = normalize_options(reg, method, request.quantization_options, ctx, plugins)
    return reg, ctx, Decision.from_registration("quantization", method, reg,
                                                "requested" if request.quantization else "default")


def normalize_options(reg: Registration, method: str, options: dict[str, Any], ctx: QuantizationContext,
                      plugins: PluginManager) -> dict[str, Any]:
    """``normalize_options(method, options, ctx)``; contract-1 backends without ``ctx`` still work."""
    component = reg.component
    with plugins.guard(reg, "plan", "normalize_options"):
        if _takes_context(component.normalize_options):
            return component.normalize_options(method, options, ctx)
        warnings.warn(f"{type(component).__name__}.normalize_options({reg.owner()}) does not take the ctx "
                      f"argument of contract 2; it keeps working until loadstone 0.3 (docs/hooks.md, contract "
                      f"version and deprecation policy)", DeprecationWarning, stacklevel=2)
        return component.normalize_options(method, options)


def _takes_context(method: Any) -> bool:
    try:
        params = inspect.signature(method).parameters.values()
    except (TypeError, ValueError):  # pragma: no cover - builtins
        return True
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 3 or any(p.kind == p.VAR_POSITIONAL for p in params) or any(
        p.name == "ctx" for p in params)


def _check_environment(reg: Registration, method: str, plugins: PluginManager) -> None:
    # Pre-quantized checkpoints need their backend's libraries as much as quantize-on-load does.
    with plugins.guard(reg, "plan", "environment_problems"):
        problems = reg.component.environment_problems()
    if problems:
        raise QuantizationError(
            f"quantization method {method!r} ({reg.owner()}) cannot run here: {'; '.join(problems)}.",
            field="quantization", found=method, fix="; ".join(problems))
