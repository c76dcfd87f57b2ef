"""loadstone: load pretrained base models for parameter-efficient fine-tuning.

``import loadstone`` is cheap: torch, transformers and every quantization library are imported
only when a load or plan needs them.

>>> import loadstone
>>> loaded = loadstone.load("./my-adapter", quantization="nf4")      # doctest: +SKIP
>>> loaded.model, loaded.report                                      # doctest: +SKIP
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

__version__ = "0.2.0"

from .contract import STAGES  # noqa: E402  (cheap, no torch)
from .contract import VERSION as CONTRACT_VERSION  # noqa: E402
from .contract.checkpoint import CheckpointInventory, RemoteHeader, TensorInfo  # noqa: E402
from .contract.engines import Engine, EngineContext, ReadAhead  # noqa: E402
from .contract.errors import *  # noqa: E402,F401,F403
from .contract.errors import __all__ as _error_names  # noqa: E402
from .contract.hookspecs import hookimpl  # noqa: E402
from .contract.placement import PlacementContext, PlacementStrategy, map_entry, placed_device  # noqa: E402
from .contract.plan import Plan  # noqa: E402
from .contract.quantization import (  # noqa: E402
    QuantizationBackend,
    QuantizationContext,
    requirement_problems,
    set_module_tensor,
)
from .contract.report import Decision, LoadReport  # noqa: E402
from .contract.request import LoadRequest  # noqa: E402
from .contract.sources import ResolveContext, ResolvedSource, Resolver  # noqa: E402
from .contract.tensors import TensorGroup, TensorMap  # noqa: E402
from .plugins import PluginManager, get_plugin_manager, reset_plugin_manager  # noqa: E402

_LAZY = {
    "load": "loadstone.api",
    "plan": "loadstone.api",
    "LoadResult": "loadstone.api",
    "count_parameters": "loadstone.api",
    "SafetensorsReader": "loadstone.engines.reader",
    "finish_loading": "loadstone.engines.finish",
    "start_finishing": "loadstone.engines.finish",
}
# Contract 1 names, kept for one minor release (see loadstone.legacy).
_DEPRECATED = {"WeightLoader": "loadstone.legacy", "TransformersWeightLoader": "loadstone.legacy"}

__all__ = [
    "__version__", "CONTRACT_VERSION", "STAGES", "load", "plan", "LoadResult", "Plan", "LoadRequest", "LoadReport",
    "Decision", "QuantizationBackend", "QuantizationContext", "PlacementStrategy", "PlacementContext", "Resolver",
    "ResolveContext", "ResolvedSource", "RemoteHeader", "Engine", "EngineContext", "ReadAhead", "TensorMap", "TensorGroup",
    "TensorInfo", "CheckpointInventory", "PluginManager", "get_plugin_manager", "reset_plugin_manager", "hookimpl",
    "requirement_problems", "set_module_tensor", "map_entry", "placed_device", "count_parameters", "SafetensorsReader",
    "finish_loading", "start_finishing",
    *_error_names,
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None and name in _DEPRECATED:
        from .legacy import DEPRECATION

        warnings.warn(DEPRECATION.format(what=f"loadstone.{name}"), DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(_DEPRECATED[name]), name)
    if module is None:
        raise AttributeError(f"module 'loadstone' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
