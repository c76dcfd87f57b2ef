"""The plugin loading policy's constants: the entry-point group, the built-ins, which distribution
provides which well-known component, the environment variables. :mod:`loadstone.plugins`
applies them."""

from __future__ import annotations

import importlib.metadata as md
import os
import pathlib
import re
import types
from typing import Any

from .contract.engines import Engine
from .contract.placement import PlacementStrategy
from .contract.quantization import QuantizationBackend
from .contract.sources import Resolver

ENTRY_POINT_GROUP = "loadstone"
KERNEL_DISTRIBUTION = "loadstone"

# Built-ins, loaded exactly like third-party entry points (name, "module:attr" value).
BUILTIN_ENTRY_POINTS = (
    ("builtin-quantization", "loadstone.builtin.quantization"),
    ("builtin-placement", "loadstone.builtin.placement"),
    ("builtin-resolvers", "loadstone.builtin.resolvers"),
    ("builtin-engines", "loadstone.builtin.engines"),
)

# Where components that are not installed come from, for error messages.
KNOWN_PROVIDERS: dict[str, dict[str, str]] = {
    "quantization": {
        "nf4": "loadstone-bnb", "fp4": "loadstone-bnb", "int8": "loadstone-bnb",
        "bitsandbytes": "loadstone-bnb", "gptq": "loadstone-gptq",
    },
    "placement": {"file": "loadstone-devicemap", "even": "loadstone-devicemap", "layers": "loadstone-devicemap",
                  "fsdp": "loadstone-devicemap"},
    "resolver": {},
    "engine": {"fsdp": "loadstone-devicemap"},
}

# Files that mark a pre-quantized checkpoint whose config.json says nothing (auto-gptq wrote only
# quantize_config.json), and the quant_method they stand for: without a backend that reads them, the
# checkpoint is refused as pre-quantized rather than mapped as plain weights.
KNOWN_QUANTIZATION_FILES: dict[str, str] = {"quantize_config.json": "gptq"}

REGISTRATION_HOOKS = {
    "quantization": ("loadstone_register_quantization_backends", QuantizationBackend),
    "placement": ("loadstone_register_placement_strategies", PlacementStrategy),
    "resolver": ("loadstone_register_resolvers", Resolver),
    "engine": ("loadstone_register_engines", Engine),
}


def _env_list(name: str) -> list[str] | None:
    raw = os.environ.get(name)
    if raw is None:
        return None
    return [part.strip() for part in raw.split(",") if part.strip()]


def canonical_distribution_name(name: str) -> str:
    """A distribution name normalised as PEP 503 says (``My_Plugin.x`` -> ``my-plugin-x``); by hand,
    because importing ``packaging`` for it cost a load 14-40 ms (bench/profile_load.py)."""
    return _SEPARATORS.sub("-", name).lower()


_SEPARATORS = re.compile(r"[-_.]+")


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _kernel_version() -> str:
    try:
        return md.version(KERNEL_DISTRIBUTION)
    except md.PackageNotFoundError:  # running from a source tree without installing
        from . import __version__

        return __version__


IN_PROCESS = "<in-process>"  # the distribution of plugins passed as PluginManager(extra_plugins=...)


def in_process_value(obj: Any) -> str:
    """How an in-process plugin is recorded and named in messages: its module or class, e.g.
    ``module mypkg.plugin`` or ``object of mypkg.plugin.AuditLog``."""
    if isinstance(obj, types.ModuleType):
        return f"module {obj.__name__}"
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{'class' if obj is cls else 'object of'} {cls.__module__}.{cls.__qualname__}"


def installed_entry_points(group: str = ENTRY_POINT_GROUP) -> list[md.EntryPoint]:
    """What ``importlib.metadata.entry_points(group=group)`` returns, in its order, sooner: only
    distributions whose ``entry_points.txt`` mentions ``group`` are parsed, and a distribution in a
    folder has that file read with a plain ``open``. importlib's scan took 18 ms of every fresh
    process on the H200 machine (200 distributions), before a load's first read.

    A distribution installed twice on ``sys.path`` counts once, where it is found first, with
    importlib's own key for that (the normalised name, read from the folder's name where it can).
    """
    found: list[md.EntryPoint] = []
    seen: set[str] = set()
    for dist in md.distributions():
        key = getattr(dist, "_normalized_name", None) or canonical_distribution_name(dist.name or "")
        if key in seen:
            continue
        seen.add(key)
        text = _entry_points_text(dist)
        if text and group in text:
            found.extend(dist.entry_points.select(group=group))
    return found


def _entry_points_text(dist: md.Distribution) -> str | None:
    folder = getattr(dist, "_path", None)
    if not isinstance(folder, pathlib.Path):  # a zip archive, or another finder's distribution
        return dist.read_text("entry_points.txt")
    try:
        with open(os.path.join(folder, "entry_points.txt"), encoding="utf-8") as file:
            return file.read()
    except OSError:  # most distributions have none; importlib ignores an unreadable one as well
        return None
