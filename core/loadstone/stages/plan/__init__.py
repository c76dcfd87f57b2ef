"""Stage 3, plan: decide task, dtype, quantization, placement and engine without reading weights.

The model is built on the meta device (:mod:`.skeleton`), sizes come from the quantization
backend's estimate (:mod:`.memory`), the device map from the placement strategy, the mapping of
checkpoint tensors onto the model from the headers (:mod:`.tensormap`), and the engine from what
each engine says it can run (:mod:`.engine`). ``load`` hands this very plan to the engine, so a
plan always equals the real load.
"""

from __future__ import annotations

from typing import Any

from ...contract.engines import ReadAhead
from ...contract.errors import LoadstoneError, PlacementError
from ...contract.placement import PlacementContext
from ...contract.plan import Plan
from ...contract.quantization import QuantizationBackend
from ...contract.records import Registration
from ...contract.report import Decision, LoadReport
from ...contract.request import LoadRequest
from ...contract.sources import Sources
from ...contract.units import device_label
from ...plugins import PluginManager
from ..adapter_fit import check_adapters_fit
from ..adapters import validate_adapter
from ..inspect import CONFIG, Inspection
from .choices import auto_class_for, choose_dtype, choose_quantization, choose_task, task_asked
from .engine import adopt_read_ahead, choose_engine
from .memory import (
    add_read_transients,
    bytes_by_device,
    check_fit,
    missing_devices,
    peak_by_device,
    present_devices,
    skeleton_tensors,
    tensor_sizes,
    transient_sizes,
)
from .offload import check_offload_folder
from .skeleton import SkeletonFactory, module_budget
from .tensormap import build_tensor_map

__all__ = ["plan_load"]


def plan_load(request: LoadRequest, plugins: PluginManager, sources: Sources, found: Inspection,
              report: LoadReport, *, loading: bool, engine: Registration | None = None,
              read_ahead: tuple[Registration, ReadAhead] | None = None) -> Plan:
    """The plan; ``read_ahead`` is what an engine started reading already (``start_read_ahead``):
    the plan keeps it if that engine is chosen, and closes it otherwise."""
    config, inventory = found.config, found.inventory
    check_offload_folder(request, sources, inventory)
    task, decision = choose_task(request, sources)
    report.decide(decision)
    asked_task = task_asked(decision)
    auto_class = auto_class_for(task, config, sources.base.path)
    dtype, decision = choose_dtype(request, config, inventory)
    report.decide(decision)
    qreg, qctx, decision = choose_quantization(request, config, plugins, sources.base.path, loading)
    report.decide(decision)
    backend = qreg.component
    import torch

    with plugins.guard(qreg, "plan", "adjust_dtype"):
        adjusted = backend.adjust_dtype(getattr(torch, dtype), qctx)
    adjusted = str(adjusted).replace("torch.", "")
    if adjusted != dtype:
        report.decide(Decision.from_registration("dtype", adjusted, qreg, f"{qreg.name} adjusted {dtype}"))
        dtype = adjusted
    qctx.dtype = getattr(torch, dtype)
    build = SkeletonFactory(auto_class, config, dtype, request, config_path=sources.base.path / CONFIG,
                            max_modules=module_budget(len(inventory.tensors)))
    skeleton = build.build()
    tensors = skeleton_tensors(skeleton)  # the skeleton is only read from here on
    sizes, converted = tensor_sizes(tensors, qreg, qctx, plugins)
    tensor_map, notes = _map_tensors(skeleton, found, sources, qreg, qctx, plugins, converted, asked_task)
    report.notes.extend(notes)
    transient = _in_flight(tensors, qreg, qctx, plugins, tensor_map, inventory)

    spec = request.placement
    preg = plugins.placement_strategy("explicit" if isinstance(spec, dict) else spec)
    pctx = PlacementContext(spec, skeleton, sizes, qctx, request, transient)
    with plugins.guard(preg, "plan", "place"):
        device_map = preg.component.place(pctx)
    with plugins.guard(qreg, "plan", "check_placement"):
        device_map = backend.check_placement(dict(device_map), qctx)
    qctx.device_map = dict(device_map)
    _check_devices_present(device_map, request, preg, report)
    report.decide(Decision.from_registration("placement", preg.name if not isinstance(spec, str) or spec == preg.name
                                             else f"{preg.name} ({spec})", preg, "; ".join(pctx.notes)))
    per_device = bytes_by_device(sizes, device_map)
    # Asked again now that every tensor's device is known: work space can depend on it (bitsandbytes
    # quantizes with large temporaries on the CPU, in place on CUDA).
    transient = _in_flight(tensors, qreg, qctx, plugins, tensor_map, inventory)
    if pctx.sharded_over:  # each process holds 1/N of every tensor (FSDP); in flight, one whole tensor
        per_device = {dev: -(-n // pctx.sharded_over) for dev, n in per_device.items()}
    peaks = peak_by_device(per_device, transient, device_map)
    budget = pctx.memory_budget(device_map.values()) if any(v != "disk" for v in device_map.values()) else {}
    total = int(sum(sizes.values()))
    fits, advice = check_fit(per_device, peaks, device_map, budget, request, plugins)

    for adapter in sources.adapters:
        validate_adapter(adapter, skeleton, allow_pickle=request.allow_pickle)
    n_params = sum(p.numel() for p in skeleton.parameters())
    module_names = frozenset(n for n, _ in skeleton.named_modules())
    report.model = {"model_type": config.model_type, "architecture": type(skeleton).__name__,
                    "auto_class": auto_class.__name__, "task": task}
    if sources.adapters:  # peft wraps the skeleton it is given: a fresh one, the plan's own is kept
        check_adapters_fit(build.build(), sources.adapters, request)
    report.dtype = dtype
    with plugins.guard(qreg, "plan", "describe"):
        described = backend.describe(qctx)
    with plugins.guard(qreg, "plan", "transformers_config"):
        quantization_config = backend.transformers_config(qctx)
    report.quantization = {"backend": qreg.name, "plugin": qreg.plugin, "distribution": qreg.distribution,
                           "version": qreg.version, **described}
    report.placement = {"strategy": preg.name, "plugin": preg.plugin, "distribution": preg.distribution,
                        "version": preg.version, "device_map": {k: device_label(v) for k, v in device_map.items()},
                        "bytes_per_device": per_device, "peak_bytes_per_device": peaks, "estimated_bytes": total,
                        "budget": {device_label(k): v for k, v in budget.items()},
                        "offload_folder": request.offload_folder, "sharded_over": pctx.sharded_over}
    report.parameters = {"total": n_params}
    report.fit = {"fits": fits, "advice": advice}
    report.request = request.to_dict()
    plan = Plan(request, sources, config, inventory, task, auto_class, dtype, qctx, qreg, preg, device_map,
                per_device, n_params, fits, advice, report, module_names, quantization_config, tensor_map, peaks,
                skeleton_factory=build, sharded_over=pctx.sharded_over)
    choose_engine(plan, plugins, report, override=engine)
    adopt_read_ahead(plan, read_ahead)
    with plugins.guard(plan.engine, "plan", "extra_bytes"):
        extra = {str(k): int(v) for k, v in (plan.engine.component.extra_bytes(plan) or {}).items()}
    if extra:  # the engine's own buffers: part of the peak, and of the fit
        for device, nbytes in extra.items():
            peaks[device] = peaks.get(device, 0) + nbytes
        plan.fits, plan.advice = check_fit(per_device, peaks, device_map, budget, request, plugins)
        report.fit = {"fits": plan.fits, "advice": plan.advice}
        report.engine["extra_bytes"] = extra
    report.engine["options"] = dict(plan.engine_options)
    if plan.read_ahead is not None:
        report.engine["read_ahead"] = {str(k): int(v) for k, v in plan.read_ahead.device_bytes.items()}
    if loading:  # the engine's first build_skeleton() gets this one (see SkeletonFactory)
        build.keep(skeleton)
    return plan


def _in_flight(tensors: list[Any], qreg: Any, qctx: Any, plugins: PluginManager, tensor_map: Any,
               inventory: Any) -> dict[str, float]:
    """Bytes in flight per tensor while it loads: the backend's ``transient_bytes`` for ``qctx`` as
    it stands (before or after placement), plus what the engines read besides (add_read_transients)."""
    transient = transient_sizes(tensors, qreg, qctx, plugins)
    if tensor_map is not None:
        add_read_transients(transient, tensor_map, inventory, qctx)
    return transient


def _map_tensors(skeleton: Any, found: Inspection, sources: Sources, qreg: Any, qctx: Any, plugins: PluginManager,
                 converted: frozenset[str], asked: bool) -> tuple[Any, list[str]]:
    """The tensor map and its notes; ``None`` (with a note saying why) where it cannot be made."""
    inventory, config = found.inventory, found.config
    backend = qreg.component
    if not inventory.tensors:
        return None, ["tensor names and shapes are checked after loading (no tensor list was readable beforehand)"]
    own = type(backend)
    speaks_tensors = (own.accepts_tensor is not QuantizationBackend.accepts_tensor
                      or own.converts_tensor is not QuantizationBackend.converts_tensor)
    if qctx.pre_quantized and not speaks_tensors:
        # A contract-1 backend: its packed tensors are its own to interpret, after loading.
        return None, [f"tensor names and shapes of this pre-quantized checkpoint are checked after loading "
                      f"({qreg.name} does not describe its packed tensors: accepts_tensor)"]

    def accepts(module_name: str, rest: str, module: Any) -> bool:
        with plugins.guard(qreg, "plan", "accepts_tensor"):
            return bool(backend.accepts_tensor(module_name, rest, module, qctx))

    try:
        # The map only reads the skeleton.
        return build_tensor_map(skeleton, inventory, config, sources.base.path, dtype=qctx.dtype,
                                converts=converted.__contains__, accepts=accepts,
                                pre_quantized=qctx.pre_quantized, task_asked=asked)
    except LoadstoneError:
        raise
    except Exception as exc:  # a transformers internal changed: fall back to the post-load check, say so
        return None, [f"the pre-load tensor check could not run ({type(exc).__name__}: {exc}); tensors are "
                      f"checked after loading instead"]


def _check_devices_present(device_map, request, preg, report) -> None:
    """A map onto devices this machine lacks (accelerate only warns "Device 0 is not available" when
    max_memory names one) is a PlacementError for a load, before any weight is read; a plan keeps it,
    since planning for a bigger machine is legitimate, and says so."""
    absent = missing_devices(device_map.values())
    if not absent:
        return
    budgeted = {device_label(k) for k in (request.max_memory or {})} & set(absent)
    who = "max_memory gives a budget to" if budgeted else f"placement strategy {preg.name!r} ({preg.owner()}) uses"
    message = f"{who} {', '.join(absent)}, which this machine does not have"
    if report.kind == "plan":
        report.notes.append(message + ": this plan is for a machine that has them; a load here would fail")
        return
    raise PlacementError(message + ".", field="max_memory" if budgeted else "placement", found=", ".join(absent),
                         expected=f"devices present here: {present_devices()}",
                         fix="drop those max_memory entries, or load where those devices exist" if budgeted
                         else "choose another placement (e.g. 'cpu')")
