"""Contract 1's weight-loading seam, kept working for one minor release (deprecated in 0.2).

``load(..., weight_loader=...)`` and ``loadstone.WeightLoader`` / ``TransformersWeightLoader``
predate engines. A weight loader passed this way runs as an engine of its own for that one load
(recorded in the report as ``engine: <its name>`` with the reason "weight_loader argument
(deprecated)"); the kernel's invariants apply to it like to any engine. Write an
:class:`~loadstone.Engine` and register it with ``loadstone_register_engines`` instead.
"""

from __future__ import annotations

import warnings
from typing import Any, Protocol

from .contract.engines import Engine, EngineContext
from .contract.plan import Plan
from .contract.records import Registration
from .engines.transformers import TransformersEngine

DEPRECATION = ("{what} is deprecated since loadstone 0.2 and will be removed in 0.3: write an Engine and register "
               "it with loadstone_register_engines (docs/hooks.md#engine)")


class WeightLoader(Protocol):
    name: str

    def load(self, plan: Any) -> Any:
        """Return the base ``PreTrainedModel`` with weights placed as ``plan.device_map`` says."""


class TransformersWeightLoader(TransformersEngine):
    """The transformers engine under its contract-1 name and call signature (``load(plan)``)."""

    name = "transformers.from_pretrained"

    def __init__(self, progress: bool = False):
        self.progress = progress

    def load(self, plan: Plan, ctx: EngineContext | None = None) -> Any:  # type: ignore[override]
        return super().load(plan, ctx or EngineContext(backend=plan.quantization_backend.component,
                                                       progress=self.progress))


class _LoaderAsEngine(Engine):
    name = "weight_loader"
    description = "a contract-1 weight_loader passed to load() (deprecated)"

    def __init__(self, loader: Any):
        self.loader = loader
        self.name = str(getattr(loader, "name", type(loader).__name__))

    def load(self, plan: Plan, ctx: EngineContext) -> Any:
        return self.loader.load(plan)


def loader_engine(loader: Any) -> Registration:
    """A one-load engine registration for a contract-1 weight loader (warns once per call)."""
    warnings.warn(DEPRECATION.format(what="load(weight_loader=...)"), DeprecationWarning, stacklevel=3)
    return Registration("engine", str(getattr(loader, "name", type(loader).__name__)), _LoaderAsEngine(loader),
                        "weight_loader argument (deprecated)", "<in-process>", "")
