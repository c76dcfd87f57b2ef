"""The public entry points: :func:`plan` and :func:`load`.

Stages, each timed in the report: resolve -> inspect -> plan -> load_weights -> prepare ->
adapters -> report. ``plan`` runs the first three only and reads no weight data.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

from . import __version__
from .adapters import attach_adapters, validate_adapter
from .checkpoint import inspect_checkpoint, read_safetensors_header
from .errors import PlacementError
from .faults import offload_guard, release_failed_load
from .modelconfig import auto_class_for, choose_dtype, choose_task, load_config
from .planning import (
    Plan,
    PlacementContext,
    build_skeleton,
    bytes_by_device,
    check_fit,
    choose_quantization,
    missing_devices,
    present_devices,
    tensor_bytes,
)
from .plugins import PluginManager, RequestChange, get_plugin_manager
from .report import Decision, LoadReport
from .request import LoadRequest
from .sources import resolve_sources
from .telemetry import RssSampler, StageClock, device_peaks, reset_device_peaks
from .validation import check_weights_fit_model
from .weights import TransformersWeightLoader, WeightLoader


@dataclass
class LoadResult:
    """What :func:`load` returns."""

    model: Any
    report: LoadReport
    plan: Plan

    def __iter__(self):  # allows ``model, report = loadstone.load(...)``
        return iter((self.model, self.report))


def _request(reference: Any, kwargs: dict[str, Any]) -> LoadRequest:
    if isinstance(reference, LoadRequest):
        if kwargs:
            raise TypeError("pass either a LoadRequest or keyword arguments, not both")
        return reference
    return LoadRequest(reference, **kwargs)


def _run_plan(request: LoadRequest, plugins: PluginManager, clock: StageClock, kind: str,
              changes: list[RequestChange]) -> Plan:
    report = LoadReport(kind=kind, reference=request.reference, loadstone_version=__version__)
    final = request.to_dict()  # normalised by request.validate() since the hooks ran
    for change in changes:  # what loadstone_before_load implementations changed, and who
        record = change.record
        report.decide(Decision(f"request.{change.field}", final[change.field], f"plugin {change.plugin}",
                               f"loadstone_before_load changed it from {change.old!r}", change.plugin,
                               record.distribution if record else None, record.version if record else None))
    with clock.stage("resolve"):
        # A plan needs configs and headers only: resolvers may fetch headers instead of weights.
        sources = resolve_sources(request, plugins, weights=kind != "plan")
        report.sources = sources.to_dict()
        for d in sources.decisions:
            report.decide(d)
    with clock.stage("inspect"):
        # Weight headers first: the cheapest check, and it needs neither torch nor transformers.
        inventory = inspect_checkpoint(sources.base.path, allow_pickle=request.allow_pickle,
                                       remote_headers=sources.base.remote_headers)
        config = load_config(sources.base.path, request)
        for adapter in sources.adapters:
            if adapter.weights.suffix == ".safetensors":
                read_safetensors_header(adapter.weights)
        report.checkpoint = inventory.to_dict()
        if request.trust_remote_code:
            report.decide(Decision("remote code", "trusted", "user", "trust_remote_code=True"))
            report.notes.append("trust_remote_code is ON: code shipped with the checkpoint may run")
    with clock.stage("plan"):
        plan = _decide(request, plugins, sources, config, inventory, report, loading=kind == "load")
    report.stages = dict(clock.timings)
    plugins.call("loadstone_after_plan", "plan", plan=plan, request=request)
    return plan


def _decide(request, plugins, sources, config, inventory, report, *, loading: bool) -> Plan:
    task, decision = choose_task(request, sources)
    report.decide(decision)
    auto_class = auto_class_for(task, config, sources.base.path)
    dtype, decision = choose_dtype(request, config, inventory)
    report.decide(decision)
    qreg, qctx, decision = choose_quantization(request, config, plugins, sources.base.path, loading)
    report.decide(decision)
    import torch

    with plugins.guard(qreg, "plan", "adjust_dtype"):
        adjusted = qreg.component.adjust_dtype(getattr(torch, dtype), qctx)
    adjusted = str(adjusted).replace("torch.", "")
    if adjusted != dtype:
        report.decide(Decision.from_registration("dtype", adjusted, qreg, f"{qreg.name} adjusted {dtype}"))
        dtype = adjusted
    qctx.dtype = getattr(torch, dtype)
    skeleton = build_skeleton(auto_class, config, dtype, request)
    sizes = tensor_bytes(skeleton, qreg, qctx, plugins)

    spec = request.placement
    preg = plugins.placement_strategy("explicit" if isinstance(spec, dict) else spec)
    pctx = PlacementContext(spec, skeleton, sizes, request.max_memory, request.offload_folder, qctx, request)
    with plugins.guard(preg, "plan", "place"):
        device_map = preg.component.place(pctx)
    with plugins.guard(qreg, "plan", "check_placement"):
        device_map = qreg.component.check_placement(dict(device_map), qctx)
    qctx.device_map = dict(device_map)
    _check_devices_present(device_map, request, preg, report)
    report.decide(Decision.from_registration("placement", preg.name if not isinstance(spec, str) or spec == preg.name
                                             else f"{preg.name} ({spec})", preg, "; ".join(pctx.notes)))
    per_device = bytes_by_device(sizes, device_map)
    budget = pctx.memory_budget() if any(v not in ("disk",) for v in device_map.values()) else {}
    total = int(sum(sizes.values()))
    fits, advice = check_fit(per_device, device_map, budget, request, plugins)

    adapter_info = {}
    for adapter in sources.adapters:
        adapter_info[adapter.name] = validate_adapter(adapter, skeleton, allow_pickle=request.allow_pickle)
    n_params = sum(p.numel() for p in skeleton.parameters())
    module_names = frozenset(n for n, _ in skeleton.named_modules())
    # last use of the skeleton's parameters: the check may retype them in place (see validation.py)
    report.notes.extend(check_weights_fit_model(skeleton, inventory, config, sources.base.path, in_place=True))
    report.model = {"model_type": config.model_type, "architecture": type(skeleton).__name__,
                    "auto_class": auto_class.__name__, "task": task}
    report.dtype = dtype
    with plugins.guard(qreg, "plan", "describe"):
        described = qreg.component.describe(qctx)
    with plugins.guard(qreg, "plan", "transformers_config"):
        quantization_config = qreg.component.transformers_config(qctx)
    report.quantization = {"backend": qreg.name, "plugin": qreg.plugin, "distribution": qreg.distribution,
                           "version": qreg.version, **described}
    report.placement = {"strategy": preg.name, "plugin": preg.plugin, "distribution": preg.distribution,
                        "version": preg.version, "device_map": {k: _label(v) for k, v in device_map.items()},
                        "bytes_per_device": per_device, "estimated_bytes": total,
                        "budget": {_label(k): v for k, v in budget.items()},
                        "offload_folder": request.offload_folder}
    report.parameters = {"total": n_params}
    report.fit = {"fits": fits, "advice": advice}
    report.request = request.to_dict()
    return Plan(request, sources, config, inventory, task, auto_class, dtype, qctx, qreg, preg, device_map,
                per_device, n_params, fits, advice, report, module_names, skeleton, quantization_config)


def _check_devices_present(device_map, request, preg, report) -> None:
    """A map onto devices this machine lacks (accelerate only warns "Device 0 is not available" when
    max_memory names one) is a PlacementError for a load, before any weight is read; a plan keeps it,
    since planning for a bigger machine is legitimate, and says so."""
    absent = missing_devices(device_map.values())
    if not absent:
        return
    budgeted = {_label(k) for k in (request.max_memory or {})} & set(absent)
    who = "max_memory gives a budget to" if budgeted else f"placement strategy {preg.name!r} ({preg.owner()}) uses"
    message = f"{who} {', '.join(absent)}, which this machine does not have"
    if report.kind == "plan":
        report.notes.append(message + ": this plan is for a machine that has them; a load here would fail")
        return
    raise PlacementError(message + ".", field="max_memory" if budgeted else "placement", found=", ".join(absent),
                         expected=f"devices present here: {present_devices()}",
                         fix="drop those max_memory entries, or load where those devices exist" if budgeted
                         else "choose another placement (e.g. 'cpu')")


def _label(device: Any) -> str:
    return f"cuda:{device}" if isinstance(device, int) else str(device)


def plan(reference: Any, *, plugins: PluginManager | None = None, **kwargs: Any) -> Plan:
    """Compute what :func:`load` would do, reading configs and headers only.

    Takes the same arguments as :func:`load`. The plan's ``device_map`` is exactly the one a
    load with the same arguments uses; ``plan.fits`` and ``plan.advice`` say whether it fits.

    >>> p = loadstone.plan("./my-model", quantization="nf4", placement="auto",
    ...                    max_memory={"cuda:0": "20GiB"})          # doctest: +SKIP
    >>> p.bytes_per_device                                          # doctest: +SKIP
    {'cuda:0': 5702112256}
    """
    request = _request(reference, kwargs)
    plugins = plugins or get_plugin_manager()
    clock = StageClock()
    try:
        changes = plugins.call("loadstone_before_load", "before_load", request=request)
        request.validate()
        result = _run_plan(request, plugins, clock, "plan", changes)
        result.skeleton = None
        return result
    except BaseException as exc:
        plugins.call("loadstone_load_failed", clock.current or "before_load", request=request,
                     stage=clock.current or "before_load", error=exc)
        raise


def load(reference: Any, *, plugins: PluginManager | None = None, weight_loader: WeightLoader | None = None,
         **kwargs: Any) -> LoadResult:
    """Load a base model (and its adapters) for parameter-efficient fine-tuning.

    :param reference: a local model folder, a Hub id ``org/name[@revision]``, an adapter folder
        (its base is found from ``adapter_config.json``), or anything a resolver plugin handles.
    :param quantization: ``None`` (the checkpoint's own, else none), ``"none"``, or a method a
        backend provides (``"nf4"``, ``"int8"`` ...), or ``{"method": ..., **options}``.
    :param quantization_options: backend options (see ``loadstone plugins``).
    :param placement: ``"auto"``, ``"balanced"``, ``"sequential"``, ``"cpu"``, a device such as
        ``"cuda:1"``, ``"rank"``, a strategy from a plugin, or an explicit ``{module: device}`` map.
    :param dtype: ``"auto"`` (the checkpoint's own), ``"bfloat16"``, ``"float16"``, ``"float32"``.
    :param trainable: freeze the base and make the active adapter trainable (``False``: all frozen).
    :param adapters: extra adapters, a list of references (``"name=path"`` allowed) or a dict.
    :param base: base model reference overriding the adapter's ``base_model_name_or_path``.
    :param task: ``"causal-lm"`` (default), ``"sequence-classification"`` ...
    :param max_memory: budget per device, e.g. ``{"cuda:0": "20GiB", "cpu": "64GiB"}``.
    :param offload_folder: folder for disk offload (never the checkpoint folder).
    :param plugins: a :class:`PluginManager` (default: discovered from the environment).
    :return: :class:`LoadResult` with ``model``, ``report`` and ``plan``.

    Further keywords: ``active_adapter``, ``revision``, ``cache_dir``, ``offline``, ``token``,
    ``trust_remote_code``, ``allow_pickle``, ``attn_implementation``,
    ``gradient_checkpointing``, ``progress``.
    """
    request = _request(reference, kwargs)
    plugins = plugins or get_plugin_manager()
    clock = StageClock()
    model = None
    reset_device_peaks()
    try:
        with RssSampler() as rss, offload_guard(request.offload_folder):
            changes = plugins.call("loadstone_before_load", "before_load", request=request)
            request.validate()
            the_plan = _run_plan(request, plugins, clock, "load", changes)
            if not the_plan.fits:
                raise PlacementError("the model does not fit the memory budget: " + "; ".join(the_plan.advice),
                                     field="placement", found=the_plan.bytes_per_device,
                                     fix=the_plan.advice[0] if the_plan.advice else None)
            report = the_plan.report
            progress = request.progress if request.progress is not None else sys.stderr.isatty()
            loader = weight_loader or TransformersWeightLoader(progress=progress)
            with clock.stage("load_weights"):
                model = loader.load(the_plan)
                report.decide(Decision("weight loader", loader.name, "kernel"))
                qreg = the_plan.quantization_backend
                with plugins.guard(qreg, "load_weights", "finish_model"):
                    report.notes.extend(qreg.component.finish_model(model, the_plan.quantization))
            plugins.call("loadstone_model_loaded", "load_weights", model=model, plan=the_plan, request=request)
            with clock.stage("prepare"):
                notes = _prepare(model, the_plan, plugins)
                report.training = {"trainable": request.trainable, "notes": notes}
            with clock.stage("adapters"):
                if the_plan.sources.adapters:
                    model, report.adapters = attach_adapters(model, the_plan.sources.adapters, request)
            with clock.stage("report"):
                report.parameters = count_parameters(model)
                the_plan.skeleton = None
        report.stages = dict(clock.timings)
        report.memory = {"peak_host_rss_bytes": rss.peak, "peak_device_bytes": device_peaks()}
        result = LoadResult(model, report, the_plan)
        plugins.call("loadstone_after_load", "report", result=result)
        return result
    except BaseException as exc:
        # Release what this load allocated before the error reaches the caller (see faults.py).
        allocated = model is not None or clock.current in ("load_weights", "prepare", "adapters", "report")
        model = result = None
        release_failed_load(exc, allocated=allocated)
        stage = clock.current or "before_load"
        plugins.call("loadstone_load_failed", stage, request=request, stage=stage, error=exc)
        raise


def _prepare(model: Any, the_plan: Plan, plugins: PluginManager) -> list[str]:
    for param in model.parameters():
        param.requires_grad = False
    notes = ["base model frozen"]
    if not the_plan.request.trainable:
        model.eval()
        return notes + ["trainable=False: inference only"]
    reg = the_plan.quantization_backend
    with plugins.guard(reg, "prepare", "prepare_for_training"):
        notes += reg.component.prepare_for_training(model, the_plan.quantization)
    return notes


def count_parameters(model: Any) -> dict[str, Any]:
    """Parameter counts; packed quantized tensors count the weights they hold, not storage elements."""
    total = trainable = 0
    for param in model.parameters():
        state = getattr(param, "quant_state", None)
        shape = getattr(state, "shape", None)
        n = 1
        if shape is not None:
            for d in shape:
                n *= int(d)
        else:
            n = param.numel()
        total += n
        if param.requires_grad:
            trainable += n
    return {"total": total, "trainable": trainable, "frozen": total - trainable,
            "trainable_percent": (100.0 * trainable / total) if total else 0.0}
