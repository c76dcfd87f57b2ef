"""The engine component type: an :class:`Engine` turns a :class:`~loadstone.Plan` into a loaded
model. Built-ins: ``loadstone`` (native: skeleton on the meta device, the backend's modules
swapped in, tensors read from safetensors straight to their planned device and converted there)
and ``transformers`` (``from_pretrained`` with the plan's device map, dtype and quantization
config). ``engine="auto"`` picks, in ascending :attr:`Engine.preference`, the first engine with
no :meth:`Engine.problems` for the plan.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:  # pragma: no cover
    from .checkpoint import CheckpointInventory
    from .plan import Plan
    from .request import LoadRequest

__all__ = ["Engine", "EngineContext", "ReadAhead"]


@dataclass
class EngineContext:
    """What the kernel hands an engine besides the plan.

    :ivar backend: the plan's quantization backend, every method call guarded: an exception
        other than a :class:`~loadstone.LoadstoneError` becomes a
        :class:`~loadstone.PluginHookError` naming the backend's plugin.
    :ivar progress: show a progress bar (a terminal, or the user asked).
    :ivar notes: explanations for the report (use :meth:`note`).
    :ivar timings: seconds the engine spent on its own steps, for the report's ``engine`` section
        (``{"read": 0.42, "finish": 0.01}``); like stage times they vary from load to load.
    :ivar offload_folder: where this load may write weights placed on ``"disk"``: a fresh folder
        of its own inside the request's ``offload_folder``, which the kernel removes if the load
        fails or is interrupted and keeps while the loaded model lives; ``None`` when the plan
        puts nothing on disk. Write nowhere else.
    """

    backend: Any
    progress: bool = False
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    offload_folder: Path | None = None

    def note(self, text: str) -> None:
        self.notes.append(text)


class ReadAhead(ABC):
    """Reading an engine started before the plan (:meth:`Engine.read_ahead`), while the kernel
    imports the model's code and plans: the engine finds it as ``plan.read_ahead`` and continues it.

    :ivar device_bytes: device memory it holds, by device label (``{"cuda:0": 8 << 30}``). The
        plan counts that memory as free (it is this load's own), so the plan equals the plan of a
        load without it; the engine counts it back in :meth:`Engine.extra_bytes`.
    """

    device_bytes: dict[str, int]

    @abstractmethod
    def close(self) -> None:
        """Stop reading and free what it holds. The kernel calls it when the plan fails, when
        another engine is chosen, and after the load (whatever became of it); called again, it does
        nothing."""


class Engine(ABC):
    """Loads a planned model: the weights of ``plan.sources.base`` into ``plan.device_map``.

    Whatever the engine, the kernel then checks that no tensor was left on the meta device,
    every tensor sits on its planned device in its planned dtype and tied weights are still tied,
    and it applies freezing, training preparation and gradient checkpointing itself.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    #: ``engine="auto"`` tries engines in ascending preference (built-ins: loadstone 100,
    #: transformers 900)
    preference: ClassVar[int] = 500
    #: whether it loads plans whose placement shards every tensor over processes
    #: (``Plan.sharded_over``, e.g. loadstone-devicemap's ``fsdp``); the kernel keeps other
    #: engines from such plans, which they would load as a full copy per process
    shards: ClassVar[bool] = False

    def option_help(self) -> dict[str, str]:
        """Option name -> one-line help for ``engine_options`` (CLI ``--engine-option KEY=VALUE``),
        shown by ``loadstone plugins``."""
        return {}

    def normalize_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """Validate the user's ``engine_options`` for this engine; raise :class:`~loadstone.OptionError`.
        Called at plan time for the chosen engine; the result is ``plan.engine_options``.
        Default: an ``OptionError`` for any name not in :meth:`option_help`."""
        unknown = set(options) - set(self.option_help())
        if unknown:
            from .errors import OptionError

            raise OptionError(f"engine {self.name!r} does not take the option(s) {', '.join(sorted(unknown))}.",
                              field="engine options", expected=", ".join(sorted(self.option_help())) or "no options",
                              found=", ".join(sorted(unknown)),
                              fix="remove them, or check `loadstone plugins` for the engine's options")
        return dict(options)

    def problems(self, plan: "Plan") -> list[str]:
        """Why this engine cannot run ``plan`` (disk offload, pickle weights, a backend it cannot
        drive ...); empty if it can. Asked at plan time, so a refusal comes before any weight is
        read. Default: none."""
        return []

    def extra_bytes(self, plan: "Plan") -> dict[str, int]:
        """Device memory this engine holds while loading besides the model's tensors (its own
        buffers), by device label (``"cuda:0"``). Asked at plan time for the chosen engine, once
        ``plan.peak_bytes_per_device`` and the budget are known; the kernel adds the answer to the
        peaks and checks the fit again. An engine may settle option defaults here (in
        ``plan.engine_options``) so that the load does what the plan says. Default: ``{}``."""
        return {}

    def read_ahead(self, request: "LoadRequest", inventory: "CheckpointInventory", device: str) -> ReadAhead | None:
        """Start reading the checkpoint before the plan exists, or return ``None`` (the default).

        The kernel asks only when the request names the whole model's device (placement
        ``"cuda:0"``, ``"cpu"``, ``"rank"`` ...), which the plan cannot change, so that reading
        overlaps the import of the model's code and the planning. For ``engine="auto"`` it asks the
        engine tried first. The answer is ``plan.read_ahead`` once this engine is chosen; the
        kernel closes it otherwise. The plan may still differ from what the request promised
        (a backend can move modules): check in :meth:`extra_bytes`, and close it there and set
        ``plan.read_ahead = None`` if it does not serve the plan. Return ``None`` rather than raise
        when it cannot start: the load then reads after the plan, as without it."""
        return None

    @abstractmethod
    def load(self, plan: "Plan", ctx: EngineContext) -> Any:
        """Return the base ``PreTrainedModel`` with every weight placed as ``plan.device_map`` says.

        Build it with ``plan.build_skeleton()`` (a fresh meta-device model) and the quantization
        backend (``ctx.backend.convert_skeleton``, ``load_tensor``), or with any loader that
        honours the plan. The kernel calls the backend's ``finish_model`` afterwards."""
