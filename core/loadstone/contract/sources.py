"""Where a load's files come from: the :class:`Resolver` component type, what it is given
(:class:`ResolveContext`) and returns (:class:`ResolvedSource`), and the resolved sources of one
load (:class:`Sources`: the base model folder and its adapters)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from .checkpoint import RemoteHeader
from .report import Decision

if TYPE_CHECKING:  # pragma: no cover
    from .request import LoadRequest

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


@dataclass
class ResolveContext:
    """What a resolver may use: revision, cache folder, offline flag, token and the request.

    ``weights`` is ``False`` when only configs and headers are needed (a plan); a resolver may
    then return a source whose weight files are absent, with their headers fetched remotely
    (:attr:`ResolvedSource.remote_headers`). Resolvers that ignore it return full folders, which
    stays correct.
    """

    revision: str | None = None
    cache_dir: str | None = None
    offline: bool = False
    token: str | bool | None = None
    relative_to: Path | None = None
    request: "LoadRequest | None" = None
    weights: bool = True




@dataclass
class ResolvedSource:
    """A reference turned into a local folder.

    ``kind`` is free text describing the source (``"local"``, ``"hub"``, ``"catalog"``);
    ``revision``/``commit`` are set for versioned sources. ``resolver``/``distribution`` are
    filled in by the kernel. ``remote_headers`` (file name in ``path`` -> :class:`RemoteHeader`)
    stand in for weight files that were not downloaded; only when ``ResolveContext.weights`` was
    ``False``.
    """

    reference: str
    path: Path
    kind: str
    repo_id: str | None = None
    revision: str | None = None
    commit: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    resolver: str | None = None
    distribution: str | None = None
    remote_headers: dict[str, RemoteHeader] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "reference": self.reference,
            "path": str(self.path),
            "kind": self.kind,
            "repo_id": self.repo_id,
            "revision": self.revision,
            "commit": self.commit,
            "resolver": self.resolver,
            "distribution": self.distribution,
            **({"extra": self.extra} if self.extra else {}),
            **({"remote_headers": sorted(self.remote_headers)} if self.remote_headers is not None else {}),
        }


class Resolver(ABC):
    """Turns a reference string into a local folder.

    Resolvers are asked in ascending ``priority`` (ties by name); the first that returns a
    :class:`ResolvedSource` wins. Built-ins: ``local`` (priority 100, existing paths) and ``hub``
    (priority 900, ``org/name[@revision]``). Pick a priority between them to claim a scheme
    of your own (``catalog://...``) before the Hub resolver sees it.
    """

    name: ClassVar[str]
    priority: ClassVar[int] = 500
    description: ClassVar[str] = ""

    @abstractmethod
    def resolve(self, reference: str, ctx: ResolveContext) -> ResolvedSource | None:
        """Return the resolved source, or ``None`` if this resolver does not handle ``reference``.

        Raise :class:`~loadstone.ResolutionError` when the reference is yours but cannot be
        resolved (so that later resolvers do not try it).
        """



@dataclass
class AdapterSource:
    """An adapter of this load: its name, where it came from, its ``adapter_config.json`` and
    weights file."""

    name: str
    source: ResolvedSource
    config: dict[str, Any]
    weights: Path

    @property
    def peft_type(self) -> str:
        return str(self.config.get("peft_type"))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source.to_dict(), "peft_type": self.peft_type,
                "r": self.config.get("r"), "target_modules": self.config.get("target_modules"),
                "base_model_name_or_path": self.config.get("base_model_name_or_path")}


@dataclass
class Sources:
    """The resolved sources of one load: the base model folder, its adapters, and the decisions
    the resolvers made."""

    base: ResolvedSource
    adapters: list[AdapterSource] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"base": self.base.to_dict(), "adapters": [a.to_dict() for a in self.adapters]}
