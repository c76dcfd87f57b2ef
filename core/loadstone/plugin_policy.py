"""The plugin loading policy's constants: the entry-point group, the built-ins, which distribution
provides which well-known component, the environment variables, and how a conflict is explained.
:mod:`loadstone.plugins` applies them."""

from __future__ import annotations

import importlib.metadata as md
import os
import types
from typing import Any, Callable

from .contract.engines import Engine
from .contract.errors import PluginConflictError
from .contract.placement import PlacementStrategy
from .contract.quantization import QuantizationBackend
from .contract.records import PluginRecord, Registration
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
    "placement": {"file": "loadstone-devicemap"},
    "resolver": {},
    "engine": {},
}

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


def _canonical(name: str) -> str:
    from packaging.utils import canonicalize_name

    return canonicalize_name(name)


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


def conflict_error(first: Registration, second: Registration, methods: set[str], records: list[PluginRecord],
                   disable_hint: Callable[[str], str]) -> PluginConflictError:
    """The error for ``second`` registering what ``first`` already provides: exactly what clashes
    (a component name, or quantization methods), who registered each, and both ways out.
    ``disable_hint(plugin)`` says how to disable a plugin where this manager's disable list comes from."""
    what_kind = {"quantization": "quantization backend", "placement": "placement strategy",
                 "resolver": "resolver", "engine": "engine"}.get(second.kind, second.kind)
    shared = sorted(methods & set(getattr(first.component, "methods", ()))) if second.kind == "quantization" else []
    if first.name == second.name:
        clash, field_name, found = f"the {what_kind} name {second.name!r}", f"{second.kind} name", second.name
    else:
        clash = (f"the quantization method{'s' if len(shared) > 1 else ''} {', '.join(map(repr, shared))} "
                 f"(backends {first.name!r} and {second.name!r})")
        field_name, found = "quantization method", ", ".join(shared)
    if first.plugin == second.plugin:
        return PluginConflictError(
            f"{second.owner()} registers {clash} twice.", field=field_name, found=found,
            fix=f"fix the plugin so that each name is registered once, or disable it ({disable_hint(second.plugin)})")
    records_by_name = {r.name: r for r in records}
    ways = []
    for reg in (second, first):
        record = records_by_name.get(reg.plugin)
        if reg.distribution == IN_PROCESS:
            ways.append(f"drop {reg.plugin!r} from extra_plugins")
        elif record is not None and record.builtin:
            ways.append(f"disable the built-in {reg.plugin!r} to replace it")
        else:
            ways.append(f"pip uninstall {reg.distribution}")
    return PluginConflictError(
        f"two plugins provide {clash}: {first.owner()} and {second.owner()}; loadstone will not guess which "
        f"one you mean.", field=field_name, found=found,
        fix=f"keep one of them: disable one by plugin name ({disable_hint(second.plugin)}, or "
            f"{disable_hint(first.plugin)}), or remove one ({', or '.join(ways)})")
