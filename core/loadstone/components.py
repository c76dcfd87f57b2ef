"""The three component types plugins register: quantization backends, placement strategies and
source resolvers, plus the small value objects they exchange with the kernel.

Importing this module must stay cheap: no torch, no transformers. Components import their heavy
dependencies inside methods, so that ``loadstone plugins`` can list them without paying for it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Mapping

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .planning import PlacementContext
    from .request import LoadRequest

__all__ = [
    "QuantizationBackend",
    "QuantizationContext",
    "PlacementStrategy",
    "RemoteHeader",
    "Resolver",
    "ResolveContext",
    "ResolvedSource",
    "requirement_problems",
]


# --------------------------------------------------------------------------- requirements


def requirement_problems(requirements: tuple[str, ...] | list[str]) -> list[str]:
    """Check PEP 508 requirement strings against installed distributions without importing them.

    Returns one human-readable line per unmet requirement (empty list: all satisfied).
    Reads only distribution metadata, so it is cheap enough to run while listing plugins.
    """
    from packaging.requirements import Requirement

    problems = []
    for text in requirements:
        req = Requirement(text)
        try:
            installed = importlib.metadata.version(req.name)
        except importlib.metadata.PackageNotFoundError:
            problems.append(f"{req.name} is not installed (pip install '{text}')")
            continue
        if req.specifier and not req.specifier.contains(installed, prereleases=True):
            problems.append(f"{req.name} {installed} is installed but {text} is needed (pip install -U '{text}')")
    return problems


# --------------------------------------------------------------------------- quantization


@dataclass
class QuantizationContext:
    """What a quantization backend knows about the load it takes part in.

    ``method`` is the method the user asked for (``"nf4"``), or the checkpoint's own
    ``quant_method`` when a pre-quantized checkpoint is loaded as it is. ``options`` are the
    user's options after :meth:`QuantizationBackend.normalize_options`. ``checkpoint_config`` is
    the checkpoint's ``quantization_config`` dict when it is pre-quantized, else ``None``.
    ``device_map`` is ``None`` while sizes are estimated and placement is checked; the kernel sets
    it to the final device map before :meth:`QuantizationBackend.transformers_config` runs, so a
    backend can configure offloading for the layout actually used. ``loading`` is ``False`` when
    the kernel only plans (``loadstone.plan``): skip work only a real load needs, such as
    importing the quantization library to probe the device.
    """

    method: str
    options: dict[str, Any]
    checkpoint_config: dict[str, Any] | None
    model_config: Any
    dtype: "torch.dtype | None" = None
    request: "LoadRequest | None" = None
    device_map: dict[str, Any] | None = None
    loading: bool = True

    @property
    def pre_quantized(self) -> bool:
        return self.checkpoint_config is not None


class QuantizationBackend(ABC):
    """A quantization method (or family of methods) loadstone can load a model with.

    Subclass it, set the class attributes, and register an instance from your plugin's
    ``loadstone_register_quantization_backends(register)`` hook.

    Class attributes:
        name: the component's unique name (usually the library, e.g. ``"bitsandbytes"``).
        methods: method names users ask for (``quantization="nf4"``); unique across plugins.
        checkpoint_formats: ``quantization_config.quant_method`` values of pre-quantized
            checkpoints this backend loads as they are.
        requirements: PEP 508 strings checked with distribution metadata (no import) by
            :meth:`environment_problems`.
        description: one line shown by ``loadstone plugins``.
    """

    name: ClassVar[str]
    methods: ClassVar[tuple[str, ...]] = ()
    checkpoint_formats: ClassVar[tuple[str, ...]] = ()
    requirements: ClassVar[tuple[str, ...]] = ()
    description: ClassVar[str] = ""

    # -- discovery ---------------------------------------------------------------
    def environment_problems(self) -> list[str]:
        """Why this backend cannot run here (missing or too old dependencies); empty if it can.

        Must not import heavy modules: it runs while plugins are listed.
        """
        return requirement_problems(self.requirements)

    def claims_checkpoint(self, quantization_config: Mapping[str, Any]) -> bool:
        """Whether this backend loads a checkpoint whose config has this ``quantization_config``."""
        return str(quantization_config.get("quant_method", "")).lower() in self.checkpoint_formats

    def checkpoint_method(self, quantization_config: Mapping[str, Any]) -> str:
        """The method name (one of ``methods``, or the format itself) that describes a
        pre-quantized checkpoint this backend claimed; asking for any other method on it is an error."""
        return str(quantization_config.get("quant_method", "")).lower()

    # -- options -----------------------------------------------------------------
    def option_help(self) -> dict[str, str]:
        """Option name -> one-line help, shown by ``loadstone plugins`` and ``--help``."""
        return {}

    def normalize_options(self, method: str, options: Mapping[str, Any]) -> dict[str, Any]:
        """Validate and fill defaults for the user's options; raise :class:`~loadstone.OptionError`."""
        unknown = set(options) - set(self.option_help())
        if unknown:
            from .errors import OptionError

            raise OptionError(
                f"quantization method {method!r} ({self.name}) does not take the option(s) "
                f"{', '.join(sorted(unknown))}.",
                field="quantization options",
                expected=", ".join(sorted(self.option_help())) or "no options",
                found=", ".join(sorted(unknown)),
                fix="remove them or check `loadstone plugins` for the backend's options",
            )
        return dict(options)

    # -- planning ----------------------------------------------------------------
    def adjust_dtype(self, dtype: "torch.dtype", ctx: QuantizationContext) -> "torch.dtype":
        """The dtype non-quantized parameters are loaded in; default: unchanged."""
        return dtype

    def parameter_bytes(self, module_name: str, param_name: str, tensor: "torch.Tensor",
                        module: Any, ctx: QuantizationContext) -> float:
        """Bytes one parameter or buffer will occupy after loading (the memory estimate).

        ``tensor`` lives on the meta device in the dtype chosen for the load. The default counts
        it unquantized.
        """
        return tensor.numel() * tensor.element_size()

    def check_placement(self, device_map: dict[str, Any], ctx: QuantizationContext) -> dict[str, Any]:
        """Validate (or adjust) the device map a placement strategy chose; raise
        :class:`~loadstone.PlacementError` for layouts this method cannot run on."""
        return device_map

    # -- loading -----------------------------------------------------------------
    @abstractmethod
    def transformers_config(self, ctx: QuantizationContext) -> Any:
        """The ``quantization_config`` object handed to ``from_pretrained`` (or ``None``)."""

    def finish_model(self, model: Any, ctx: QuantizationContext) -> list[str]:
        """Finish the loaded model before anything else sees it (every engine calls it once, right
        after the last weight is in place, for trainable and frozen loads alike).

        The place to set per-module runtime flags, or to convert what needs the whole model.
        Returns short notes for the load report. The default does nothing.
        """
        return []

    def prepare_for_training(self, model: Any, ctx: QuantizationContext) -> list[str]:
        """Prepare an already frozen base model for adapter training.

        Returns short notes for the load report (what was done). The default does nothing.
        """
        return []

    def describe(self, ctx: QuantizationContext) -> dict[str, Any]:
        """Details recorded in the load report's quantization section."""
        return {"method": ctx.method, "options": dict(ctx.options), "pre_quantized": ctx.pre_quantized}


# --------------------------------------------------------------------------- placement


class PlacementStrategy(ABC):
    """Turns a model skeleton on the meta device plus a memory budget into a device map.

    ``name`` is what users pass as ``placement=``. Override :meth:`matches` to accept a family
    of specs (the built-in ``device`` strategy accepts ``cuda:0``, ``mps`` ...).
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""

    def matches(self, spec: str) -> bool:
        """Whether this strategy handles the placement spec ``spec``."""
        return spec == self.name

    @abstractmethod
    def place(self, ctx: "PlacementContext") -> dict[str, Any]:
        """Return a device map: module name prefix -> device (``"cpu"``, ``"disk"``, ``"cuda:0"``, int).

        ``ctx`` gives the meta model, per-module byte sizes after quantization, the memory budget,
        the offload folder and :meth:`PlacementContext.infer_device_map`, accelerate's algorithm
        fed with loadstone's size estimate.
        """


# --------------------------------------------------------------------------- resolvers


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


@dataclass(frozen=True)
class RemoteHeader:
    """A safetensors file's header read without downloading the file (HTTP range requests).

    ``size`` is the whole file's size in bytes; ``header_length`` the length its 8-byte prefix
    declares (``None`` when the file is shorter than 8 bytes); ``header`` the JSON header bytes
    that were fetched (empty when the declared length was implausible, so the kernel reports it
    exactly as for a local file); ``url`` where it was read, for messages.
    """

    size: int
    header_length: int | None
    header: bytes
    url: str = ""


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


_DEVICE_RE = re.compile(r"^(cpu|meta|mps|cuda|xpu|npu|hpu|mlu)(:\d+)?$")


def is_device_spec(spec: str) -> bool:
    """``cuda:1``, ``mps``, ``cpu`` ... (used by the built-in single-device strategy)."""
    return bool(_DEVICE_RE.match(spec))
