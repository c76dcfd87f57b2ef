"""What plugin discovery works with: the entry-point group, the built-ins, the components a
plugin registered (:class:`Registration`), what became of each plugin (:class:`PluginRecord`),
and the environment variables of the loading policy. :mod:`loadstone.plugins` uses these."""

from __future__ import annotations

import importlib.metadata as md
import os
from dataclasses import dataclass, field
from typing import Any

from .components import PlacementStrategy, QuantizationBackend, Resolver

ENTRY_POINT_GROUP = "loadstone"
KERNEL_DISTRIBUTION = "loadstone"

# Built-ins, loaded exactly like third-party entry points (name, "module:attr" value).
BUILTIN_ENTRY_POINTS = (
    ("builtin-quantization", "loadstone.builtin.quantization"),
    ("builtin-placement", "loadstone.builtin.placement"),
    ("builtin-resolvers", "loadstone.builtin.resolvers"),
)

# Where components that are not installed come from, for error messages.
KNOWN_PROVIDERS: dict[str, dict[str, str]] = {
    "quantization": {
        "nf4": "loadstone-bnb", "fp4": "loadstone-bnb", "int8": "loadstone-bnb",
        "bitsandbytes": "loadstone-bnb", "gptq": "loadstone-gptq",
    },
    "placement": {"file": "loadstone-devicemap"},
    "resolver": {},
}

REGISTRATION_HOOKS = {
    "quantization": ("loadstone_register_quantization_backends", QuantizationBackend),
    "placement": ("loadstone_register_placement_strategies", PlacementStrategy),
    "resolver": ("loadstone_register_resolvers", Resolver),
}


class PluginLoadWarning(UserWarning):
    """Emitted when a broken plugin is skipped."""


@dataclass
class Registration:
    """A component together with who registered it."""

    kind: str
    name: str
    component: Any
    plugin: str
    distribution: str
    version: str

    def owner(self) -> str:
        return f"plugin {self.plugin!r} from {f'{self.distribution} {self.version}'.strip()}"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "plugin": self.plugin,
                "distribution": self.distribution, "version": self.version}


@dataclass
class RequestChange:
    """A request field a ``loadstone_before_load`` implementation changed."""

    plugin: str
    record: "PluginRecord | None"
    field: str
    old: Any
    new: Any


@dataclass
class PluginRecord:
    """One discovered entry point and what became of it."""

    name: str
    value: str
    distribution: str
    version: str
    builtin: bool
    status: str = "pending"  # loaded | failed | disabled | not-allowed
    error: str | None = None
    components: list[Registration] = field(default_factory=list)
    disabled_components: list[str] = field(default_factory=list)  # "kind name", skipped by the disable list

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "entry_point": self.value, "distribution": self.distribution,
            "version": self.version, "builtin": self.builtin, "status": self.status,
            "error": self.error,
            "components": [{"kind": c.kind, "name": c.name} for c in self.components],
            "disabled_components": list(self.disabled_components),
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
