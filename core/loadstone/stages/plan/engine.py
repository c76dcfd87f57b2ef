"""Which engine loads the plan: the one asked for, or with ``engine="auto"`` the most preferred
engine that says it can run it. Asked at plan time, so a refusal comes before any weight is read."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from ...contract.checkpoint import CheckpointInventory
from ...contract.engines import ReadAhead
from ...contract.errors import EngineError, LoadstoneError
from ...contract.placement import HELD_BY_READ_AHEAD
from ...contract.plan import Plan
from ...contract.records import Registration
from ...contract.report import Decision, LoadReport
from ...contract.request import LoadRequest
from ...contract.units import device_label
from ...plugins import PluginManager
from .memory import missing_devices


def start_read_ahead(request: LoadRequest, plugins: PluginManager,
                     inventory: CheckpointInventory) -> tuple[Registration, ReadAhead] | None:
    """Let the engine start reading before the plan (``Engine.read_ahead``) when the request alone
    names the whole model's device: the engine asked for, or with ``engine="auto"`` the engine
    tried first. ``None`` when nothing started."""
    spec = request.placement
    if not isinstance(spec, str) or not inventory.tensors:
        return None
    try:
        strategy = plugins.placement_strategy(spec)
        candidates = plugins.engines() if request.engine == "auto" else [plugins.engine(request.engine)]
    except LoadstoneError:
        return None  # the plan says what is wrong, in its own words
    with plugins.guard(strategy, "plan", "whole_model_device"):
        device = strategy.component.whole_model_device(spec)
    if device is None or not candidates or missing_devices([device]):
        return None
    engine = candidates[0]
    with plugins.guard(engine, "plan", "read_ahead"):
        started = engine.component.read_ahead(request, inventory, device_label(device))
    return (engine, started) if started is not None else None


@contextmanager
def budget_with(read_ahead: ReadAhead | None) -> Iterator[None]:
    """While the plan is made, memory the read-ahead holds counts as free (see ``HELD_BY_READ_AHEAD``)."""
    token = HELD_BY_READ_AHEAD.set(dict(read_ahead.device_bytes) if read_ahead is not None else {})
    try:
        yield
    finally:
        HELD_BY_READ_AHEAD.reset(token)


def adopt_read_ahead(plan: Plan, started: tuple[Registration, ReadAhead] | None) -> None:
    """The chosen engine's own read-ahead becomes ``plan.read_ahead``; another engine's is closed."""
    if started is None:
        return
    engine, ahead = started
    if plan.engine is not None and plan.engine.name == engine.name:
        plan.read_ahead = ahead
    else:
        ahead.close()


def close_read_ahead(plan: Plan | None) -> None:
    """Close the plan's read-ahead, if it still has one (the kernel's last word on it)."""
    ahead = plan.read_ahead if plan is not None else None
    if ahead is not None:
        plan.read_ahead = None
        ahead.close()


def choose_engine(plan: Plan, plugins: PluginManager, report: LoadReport, *,
                  override: Registration | None = None) -> None:
    if override is not None:  # a contract-1 weight_loader passed to load(): it runs, whatever it is
        plan.engine = override
        report.decide(Decision.from_registration("engine", override.name, override, override.plugin))
        report.engine = {"name": override.name, "plugin": override.plugin, "distribution": override.distribution,
                         "version": override.version, "requested": "weight_loader", "not_able": {}}
        return
    engines = plugins.engines()
    problems: dict[str, list[str]] = {}
    for reg in engines:
        with plugins.guard(reg, "plan", "problems"):
            problems[reg.name] = [str(p) for p in reg.component.problems(plan)]
        if plan.sharded_over and not reg.component.shards:
            problems[reg.name].append(f"it loads whole tensors, and this plan shards every tensor over "
                                      f"{plan.sharded_over} processes ({plan.placement_strategy.name} placement)")
    plan.engine_problems = problems
    wanted = plan.request.engine
    able = [r.name for r in engines if not problems[r.name]]
    if wanted == "auto":
        chosen = next((r for r in engines if not problems[r.name]), None)
        if chosen is None:
            raise EngineError("no installed engine can run this load: " + _reasons(problems) + ".", field="engine",
                              found="auto", expected="an engine without problems for this plan",
                              fix="change what the reasons name (placement, weights format, quantization), or "
                                  "install an engine plugin that can")
        passed = {name: p for name, p in problems.items() if p and _rank(engines, name) < _rank(engines, chosen.name)}
        reason = "auto: the first engine (by preference) that can run this plan"
        if passed:
            reason += "; passed over " + _reasons(passed)
    else:
        chosen = plugins.engine(wanted)
        if problems[chosen.name]:
            raise EngineError(
                f"engine {chosen.name!r} ({chosen.owner()}) cannot run this load: {'; '.join(problems[chosen.name])}.",
                field="engine", found=chosen.name, expected=", ".join(able) or "an engine that can run it",
                fix=f"use engine='auto' (CLI: --engine auto)" + (f", which picks {able[0]!r} here" if able else ""))
        reason = "requested"
    plan.engine = chosen
    with plugins.guard(chosen, "plan", "normalize_options"):
        plan.engine_options = chosen.component.normalize_options(dict(plan.request.engine_options))
    report.decide(Decision.from_registration("engine", chosen.name, chosen, reason))
    report.engine = {"name": chosen.name, "plugin": chosen.plugin, "distribution": chosen.distribution,
                     "version": chosen.version, "requested": wanted, "options": dict(plan.engine_options),
                     "not_able": {name: p for name, p in problems.items() if p}}


def _rank(engines: list, name: str) -> int:
    return next(i for i, r in enumerate(engines) if r.name == name)


def _reasons(problems: dict[str, list[str]]) -> str:
    return "; ".join(f"{name}: {', '.join(p)}" for name, p in problems.items() if p)
