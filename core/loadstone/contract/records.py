"""Who registered what: a component with its plugin and distribution (:class:`Registration`),
what became of each discovered plugin (:class:`PluginRecord`), and a request field a
``loadstone_before_load`` implementation changed (:class:`RequestChange`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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
    #: The plugin's entry point (``module:attr``), or for an in-process plugin what object it is.
    entry_point: str = ""

    def owner(self) -> str:
        return f"plugin {self.plugin!r} {origin(self.distribution, self.version, self.entry_point)}"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "plugin": self.plugin,
                "distribution": self.distribution, "version": self.version}


def origin(distribution: str, version: str, entry_point: str) -> str:
    """``from loadstone-bnb 0.2.0``, or for a plugin passed as ``extra_plugins`` what it is."""
    if distribution == "<in-process>":
        return f"(<in-process>, {entry_point}, passed as extra_plugins)" if entry_point else "(<in-process>)"
    return f"from {f'{distribution} {version}'.strip()}"


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
    status: str = "pending"  # loaded | failed | conflict | disabled | not-allowed
    error: str | None = None
    components: list[Registration] = field(default_factory=list)
    disabled_components: list[str] = field(default_factory=list)  # "kind name", skipped by the disable list

    def origin(self) -> str:
        return origin(self.distribution, self.version, self.value)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "entry_point": self.value, "distribution": self.distribution,
            "version": self.version, "builtin": self.builtin, "status": self.status,
            "error": self.error,
            "components": [{"kind": c.kind, "name": c.name} for c in self.components],
            "disabled_components": list(self.disabled_components),
        }


