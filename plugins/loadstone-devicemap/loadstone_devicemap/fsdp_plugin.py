"""The ``devicemap-fsdp`` plugin: placement ``fsdp``, the ``fsdp`` engine, and each process's peak
memory gathered into every process's report."""

from __future__ import annotations

from loadstone import hookimpl

from .fsdp import FsdpEngine, FsdpPlacement, gather_rank_memory


@hookimpl
def loadstone_register_placement_strategies(register):
    register(FsdpPlacement())


@hookimpl
def loadstone_register_engines(register):
    register(FsdpEngine())


@hookimpl
def loadstone_after_plan(plan, request):
    engine = plan.engine.name if plan.engine is not None else None
    if plan.placement_strategy.name != FsdpPlacement.name or isinstance(getattr(plan.engine, "component", None),
                                                                        FsdpEngine):
        return
    why = "; ".join(plan.engine_problems.get(FsdpEngine.name) or [f"engine {engine!r} was asked for"])
    if plan.report.kind == "plan":  # planning for a torchrun job from outside one is fine
        plan.report.notes.append(f"placement 'fsdp' loads with the fsdp engine under torchrun; here it could not: {why}")
        return
    from loadstone import EngineError

    raise EngineError(
        f"placement 'fsdp' shards every tensor over the torchrun processes, which engine {engine!r} does not do (it "
        f"would load a full copy per process); the fsdp engine cannot run here: {why}.", field="engine",
        expected="the fsdp engine", found=engine, fix="run under torchrun after torch.distributed.init_process_group() "
        "with engine='auto' (or 'fsdp'); for one full copy per process use placement='rank'")


@hookimpl
def loadstone_after_load(result):
    if isinstance(getattr(result.plan.engine, "component", None), FsdpEngine):
        gather_rank_memory(result.report)
