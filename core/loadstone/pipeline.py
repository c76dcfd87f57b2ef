"""Runs the stages in order (see :mod:`loadstone.stages`), times each one, and keeps the failure
policy: hooks hear about every failure, and a failed load releases what it allocated."""

from __future__ import annotations

import sys
from typing import Any, Callable

from . import __version__
from .contract.errors import PlacementError
from .contract.plan import Plan
from .contract.records import Registration, RequestChange
from .contract.report import Decision, LoadReport
from .contract.units import format_size
from .contract.request import LoadRequest
from .faults import offload_workspace, release_failed_load
from .plugins import PluginManager
from .process_group import unpin_default_group
from .stages.adapters import attach_adapters
from .stages.inspect import inspect, inspect_weights
from .stages.load_weights import load_weights
from .stages.plan import plan_load
from .stages.plan.engine import budget_with, close_read_ahead, start_read_ahead
from .stages.prepare import prepare
from .stages.report import count_parameters
from .stages.resolve import resolve_sources
from .telemetry import RssSampler, StageClock, current_rss, device_peaks, reset_device_peaks
from .termination import TerminatedBySignal, signals_unwind_the_load


def run_plan(request: LoadRequest, plugins: PluginManager, clock: StageClock, kind: str,
             changes: list[RequestChange], engine: Registration | None = None) -> Plan:
    """Stages resolve, inspect and plan; ``kind`` is ``"plan"`` or ``"load"`` (a load's plan may do
    work a bare plan skips, such as importing the quantization library)."""
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
        inventory = inspect_weights(request, sources)
    started = None
    if kind == "load" and engine is None:
        # A load whose request names the model's device lets the engine start reading as soon as
        # the weight headers are checked, while the configuration is read, the model's code
        # imported and the plan made (Engine.read_ahead): deciding that is the plan's work.
        with clock.stage("plan"):
            started = start_read_ahead(request, plugins, inventory)
    try:
        with clock.stage("inspect"):
            found = inspect(request, sources, report, inventory)
        with clock.stage("plan"):
            with budget_with(started[1] if started else None):
                plan = plan_load(request, plugins, sources, found, report, loading=kind == "load", engine=engine,
                                 read_ahead=started)
    except BaseException:
        if started:
            started[1].close()
        raise
    report.stages = dict(clock.timings)
    try:
        plugins.call("loadstone_after_plan", "plan", plan=plan, request=request)
    except BaseException:
        close_read_ahead(plan)
        raise
    return plan


def plan(request: LoadRequest, plugins: PluginManager) -> Plan:
    clock = StageClock()
    try:
        changes = plugins.call("loadstone_before_load", "before_load", request=request)
        request.validate()
        return run_plan(request, plugins, clock, "plan", changes)
    except BaseException as exc:
        plugins.call("loadstone_load_failed", clock.current or "before_load", request=request,
                     stage=clock.current or "before_load", error=exc)
        raise
    finally:
        unpin_default_group()  # a plan imports transformers too (see loadstone.process_group)


def load(request: LoadRequest, plugins: PluginManager, engine: Registration | None = None,
         finish: Callable[[Any, LoadReport, Plan], Any] | None = None) -> Any:
    """Every stage; ``engine`` overrides the plan's engine choice (the deprecated ``weight_loader``).

    Returns ``finish(model, report, plan)`` (default: that tuple); ``finish`` runs inside the
    load, so its failure (a ``loadstone_after_load`` hook) is a failed load like any other.
    Signals that end the process unwind the load first (see :mod:`loadstone.termination`).
    """
    with signals_unwind_the_load():
        return _load(request, plugins, engine, finish or (lambda *done: done))


def _load(request: LoadRequest, plugins: PluginManager, engine: Registration | None,
          finish: Callable[[Any, LoadReport, Plan], Any]) -> Any:
    clock = StageClock()
    model = the_plan = None
    reset_device_peaks()
    try:
        with RssSampler() as rss:
            changes = plugins.call("loadstone_before_load", "before_load", request=request)
            request.validate()
            the_plan = run_plan(request, plugins, clock, "load", changes, engine)
            if not the_plan.fits:
                peaks = the_plan.peak_bytes_per_device
                raise PlacementError("the model does not fit the memory budget.", field="placement",
                                     found="peak " + ", ".join(f"{device} {format_size(n)}" for device, n in peaks.items()),
                                     fix="; ".join(the_plan.advice) or None)
            report = the_plan.report
            progress = request.progress if request.progress is not None else sys.stderr.isatty()
            on_disk = "disk" in the_plan.bytes_per_device
            with offload_workspace(request.offload_folder, on_disk) as offload:
                with clock.stage("load_weights"):
                    model = base = load_weights(the_plan, plugins, report, progress=progress, offload=offload)
                    close_read_ahead(the_plan)  # the engine normally closed it as it finished reading
                plugins.call("loadstone_model_loaded", "load_weights", model=model, plan=the_plan, request=request)
                with clock.stage("prepare"):
                    report.training = {"trainable": request.trainable, "notes": prepare(model, the_plan, plugins)}
                with clock.stage("adapters"):
                    if the_plan.sources.adapters:
                        model, report.adapters, notes = attach_adapters(model, the_plan.sources.adapters, request,
                                                                        the_plan.sources.base)
                        report.notes += notes
                with clock.stage("report"):
                    report.parameters = count_parameters(model)
                    if offload is not None and offload.keep_for(base):
                        report.placement["offload_workspace"] = str(offload.path)
                report.stages = dict(clock.timings)
                report.memory = {"peak_host_rss_bytes": max(rss.peak, current_rss()),
                                 "peak_device_bytes": device_peaks()}
                result = finish(model, report, the_plan)
        return result
    except BaseException as exc:
        # Release what this load allocated before the error reaches the caller (see faults.py); a
        # process about to end by a signal skips the garbage collection (seconds in a big process).
        allocated = model is not None or clock.current in ("load_weights", "prepare", "adapters", "report")
        close_read_ahead(the_plan)
        model = base = result = None
        release_failed_load(exc, allocated=allocated and not isinstance(exc, TerminatedBySignal))
        stage = clock.current or "before_load"
        plugins.call("loadstone_load_failed", stage, request=request, stage=stage, error=exc)
        raise
    finally:
        # the first load imports transformers, in a distributed program after init_process_group
        unpin_default_group()
