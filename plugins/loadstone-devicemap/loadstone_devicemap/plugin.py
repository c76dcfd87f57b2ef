"""The ``devicemap`` plugin: placement strategies ``file:PATH``, ``even`` and ``layers:N``, and the
free-space check before disk offload (:mod:`.offload`)."""

from __future__ import annotations

from loadstone import hookimpl

from .even import EvenPlacement, LayersPlacement
from .mapfile import FilePlacement
from .offload import check_offload_space


@hookimpl
def loadstone_register_placement_strategies(register):
    for strategy in (FilePlacement(), EvenPlacement(), LayersPlacement()):
        register(strategy)


@hookimpl
def loadstone_after_plan(plan, request):
    check_offload_space(plan)
