"""The ``devicemap-fsdp`` plugin: placement ``fsdp``, the ``fsdp`` engine (the kernel keeps sharded
plans from engines that do not shard), and each process's peak memory gathered into every
process's report."""

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
def loadstone_after_load(result):
    if isinstance(getattr(result.plan.engine, "component", None), FsdpEngine):
        gather_rank_memory(result.report)
