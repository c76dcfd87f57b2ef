"""loadstone: load pretrained base models for parameter-efficient fine-tuning.

``import loadstone`` is cheap: torch, transformers and every quantization library are imported
only when a load or plan needs them.

>>> import loadstone
>>> loaded = loadstone.load("./my-adapter", quantization="nf4")      # doctest: +SKIP
>>> loaded.model, loaded.report                                      # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

from .components import (  # noqa: E402  (cheap, no torch)
    PlacementStrategy,
    QuantizationBackend,
    QuantizationContext,
    RemoteHeader,
    ResolveContext,
    ResolvedSource,
    Resolver,
    requirement_problems,
)
from .errors import *  # noqa: E402,F401,F403
from .errors import __all__ as _error_names  # noqa: E402
from .hookspecs import hookimpl  # noqa: E402
from .plugins import PluginManager, get_plugin_manager, reset_plugin_manager  # noqa: E402
from .report import Decision, LoadReport  # noqa: E402
from .request import LoadRequest  # noqa: E402

_LAZY = {
    "load": "loadstone.api",
    "plan": "loadstone.api",
    "LoadResult": "loadstone.api",
    "count_parameters": "loadstone.api",
    "Plan": "loadstone.planning",
    "PlacementContext": "loadstone.planning",
    "WeightLoader": "loadstone.weights",
    "TransformersWeightLoader": "loadstone.weights",
}

__all__ = [
    "__version__", "load", "plan", "LoadResult", "Plan", "LoadRequest", "LoadReport", "Decision",
    "QuantizationBackend", "QuantizationContext", "PlacementStrategy", "PlacementContext", "Resolver",
    "ResolveContext", "ResolvedSource", "RemoteHeader", "PluginManager", "get_plugin_manager", "reset_plugin_manager",
    "hookimpl", "requirement_problems", "count_parameters", "WeightLoader", "TransformersWeightLoader",
    *_error_names,
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'loadstone' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
