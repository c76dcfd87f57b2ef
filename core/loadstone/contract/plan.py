"""What a load will do, decided before any weight is read: the :class:`Plan`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # pragma: no cover
    from .checkpoint import CheckpointInventory
    from .quantization import QuantizationContext
    from .records import Registration
    from .report import LoadReport
    from .request import LoadRequest
    from .sources import Sources
    from .tensors import TensorMap

__all__ = ["Plan"]


@dataclass
class Plan:
    """What a load will do, computed from configs and safetensors headers only.

    ``loadstone.plan()`` returns it; ``loadstone.load()`` computes the same plan and hands it to
    the chosen engine, so the device map a plan shows is the one the load uses.

    :ivar device_map: module-name prefix -> device, as the placement strategy chose it and the
        quantization backend checked it.
    :ivar bytes_per_device: resting bytes per device label after quantization.
    :ivar peak_bytes_per_device: resting bytes plus the largest tensor in flight on that device
        while loading (the full-precision copy a quantizing backend converts).
    :ivar fits: whether every device's peak fits its budget; ``advice`` says what to change.
    :ivar tensor_map: which checkpoint tensors fill which model tensors (renames and fusions
        included); ``None`` when the checkpoint's tensors could not be listed beforehand.
    :ivar engine: the engine registration chosen for the load; ``engine_problems`` says why any
        other engine could not run this plan.
    :ivar read_ahead: what the chosen engine started reading before the plan
        (:meth:`~loadstone.contract.engines.Engine.read_ahead`), or ``None``; always ``None`` in a
        plan from ``loadstone.plan()``, which reads no weights.
    :ivar sharded_over: ``None``, or the number of processes that share every tensor (set by a
        sharding placement such as loadstone-devicemap's ``fsdp``): ``bytes_per_device`` is then
        one process's share, and only an engine with ``Engine.shards`` loads the plan.
    """

    request: "LoadRequest"
    sources: "Sources"
    config: Any
    inventory: "CheckpointInventory"
    task: str
    auto_class: Any
    dtype: str
    quantization: "QuantizationContext"
    quantization_backend: "Registration"
    placement_strategy: "Registration"
    device_map: dict[str, Any]
    bytes_per_device: dict[str, int]
    parameter_count: int
    fits: bool
    advice: list[str]
    report: "LoadReport"
    module_names: frozenset[str] = field(default_factory=frozenset, repr=False)
    #: what the quantization backend's ``transformers_config`` returned (for the transformers engine)
    quantization_config: Any = field(default=None, repr=False)
    tensor_map: "TensorMap | None" = field(default=None, repr=False)
    peak_bytes_per_device: dict[str, int] = field(default_factory=dict)
    engine: "Registration | None" = None
    engine_problems: dict[str, list[str]] = field(default_factory=dict)
    #: the chosen engine's options after its ``normalize_options``
    engine_options: dict[str, Any] = field(default_factory=dict)
    skeleton_factory: Callable[[], Any] | None = field(default=None, repr=False)
    sharded_over: int | None = None
    read_ahead: Any = field(default=None, repr=False)

    @property
    def torch_dtype(self) -> Any:
        import torch

        return getattr(torch, self.dtype)

    def build_skeleton(self) -> Any:
        """A fresh model on the meta device, in the load dtype (quantized modules not swapped in):
        the skeleton the plan was computed on. Each call builds a new one."""
        if self.skeleton_factory is None:  # pragma: no cover - the plan stage always sets it
            raise RuntimeError("this plan has no skeleton factory")
        return self.skeleton_factory()

    def to_dict(self) -> dict[str, Any]:
        return self.report.to_dict()

    def render(self) -> str:
        return self.report.render()
