"""The placement component type: :class:`PlacementStrategy` turns a model skeleton and a memory
budget into a device map, given a :class:`PlacementContext`.

Importing this module stays cheap (no torch, no transformers): the context's helpers import
accelerate's placement code when they run.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Iterable

from .units import device_label, normalize_device

if TYPE_CHECKING:  # pragma: no cover
    from .quantization import QuantizationContext
    from .request import LoadRequest

__all__ = ["PlacementStrategy", "PlacementContext", "map_entry", "placed_device"]


def map_entry(name: str, device_map: dict[str, Any]) -> str | None:
    """The device-map key that places ``name`` (a module or tensor name): the longest prefix
    that equals it or ends at a dot before it, ``""`` for the whole model; ``None`` if none does."""
    best = None
    for key in device_map:
        if key == "" or name == key or name.startswith(key + "."):
            if best is None or len(key) > len(best):
                best = key
    return best


def placed_device(name: str, device_map: dict[str, Any]) -> str:
    """Where ``device_map`` puts ``name``, as a device string: ``"cuda:N"`` for a GPU index, the
    map's own value otherwise (``"cpu"``, ``"disk"``, ``"cuda:1"`` ...), ``"cpu"`` where no key covers it."""
    key = map_entry(name, device_map)
    return device_label(device_map[key]) if key is not None else "cpu"


@dataclass
class PlacementContext:
    """Everything a placement strategy needs to produce a device map.

    :ivar spec: the user's ``placement`` value (a string, or a dict for explicit maps).
    :ivar model: the model skeleton on the meta device (quantized modules not yet swapped in).
    :ivar tensor_bytes: full parameter/buffer name -> bytes after quantization (tied weights once).
    :ivar quantization: the :class:`QuantizationContext` of this load.
    :ivar request: the request being run; ``max_memory`` and ``offload_folder`` read from it.
    :ivar transient_bytes: full tensor name -> bytes in flight while that tensor is loaded
        (the full-precision copy a quantizing backend converts); the peak a device must hold
        is its resting bytes plus the largest of these placed on it.
    :ivar sharded_over: ``None`` (every process holds whole tensors), or the number of processes
        that share every tensor, each holding ``1/sharded_over`` of it (FSDP). A strategy that
        shards sets it; the plan divides each device's resting bytes by it (the transient peak
        stays whole: a tensor is whole while it is converted), and only an engine that shards
        (``Engine.shards``) may load the plan.
    """

    spec: Any
    model: Any
    tensor_bytes: dict[str, float]
    quantization: "QuantizationContext"
    request: "LoadRequest"
    transient_bytes: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    sharded_over: int | None = None

    @property
    def max_memory(self) -> dict[str | int, int] | None:
        """The user's budget (device -> bytes), or ``None``."""
        return self.request.max_memory

    @property
    def offload_folder(self) -> str | None:
        """Where disk-offloaded weights may go, or ``None`` (no disk offload)."""
        return self.request.offload_folder

    def note(self, text: str) -> None:
        """Explain a choice; notes become the reason of the placement decision in the report."""
        self.notes.append(text)

    @property
    def no_split_module_classes(self) -> list[str]:
        """Classes a device map must not split (the model's ``_no_split_modules``: decoder layers)."""
        return list(getattr(self.model, "_no_split_modules", None) or [])

    # ------------------------------------------------------------------ helpers for strategies

    def decoder_layers(self) -> list[str]:
        """Names of the repeated blocks (instances of ``no_split_module_classes``), in model order:
        ``["model.layers.0", "model.layers.1", ...]``. Nested blocks are not listed twice."""
        classes = set(self.no_split_module_classes)
        found: list[str] = []
        for name, module in self.model.named_modules():
            if type(module).__name__ in classes and not any(name.startswith(p + ".") for p in found):
                found.append(name)
        return found

    def tied_groups(self) -> list[set[str]]:
        """Parameter names that are one tensor (GPT-2's ``lm_head.weight`` and ``transformer.wte.weight``):
        a device map must keep each group on one device."""
        groups: list[set[str]] = []
        for target, source in (getattr(self.model, "all_tied_weights_keys", None) or {}).items():
            group = next((g for g in groups if target in g or source in g), None)
            if group is None:
                groups.append({target, source})
            else:
                group |= {target, source}
        return groups

    def module_bytes(self, prefix: str) -> int:
        """Bytes after quantization of every tensor under module ``prefix`` (``""``: the model)."""
        return int(sum(n for name, n in self.tensor_bytes.items()
                       if prefix == "" or name == prefix or name.startswith(prefix + ".")))

    def bytes_by_device(self, device_map: dict[str, Any]) -> dict[str, int]:
        """Resting bytes each device of ``device_map`` would hold (labels such as ``"cuda:0"``)."""
        out: dict[str, float] = {}
        for name, nbytes in self.tensor_bytes.items():
            key = map_entry(name, device_map)
            if key is not None:
                label = device_label(device_map[key])
                out[label] = out.get(label, 0.0) + nbytes
        return {k: int(round(v)) for k, v in out.items()}

    def local_cuda_device(self) -> tuple[int, int | None]:
        """This process's ``LOCAL_RANK`` (``torchrun`` sets it; 0 otherwise) and the CUDA device it
        should use, or ``None`` on a machine without CUDA. A rank with no visible GPU of its own is a
        :class:`~loadstone.PlacementError` (one process per GPU is the layout both DDP and FSDP need)."""
        return local_cuda_device()

    def memory_budget(self, devices: Iterable[Any] | None = None) -> dict[str | int, int]:
        """The user's ``max_memory``, or the free memory of each device (the CPU's included).

        ``devices`` (device-map values) limits the detection to those devices: accelerate's
        detection creates a CUDA context, hundreds of MiB, on every visible GPU, which a process
        that loads onto one GPU of eight (one rank of ``torchrun``) must not leave on the other
        seven. Without ``devices``, every device is asked (the budget ``auto`` spreads over).
        """
        from transformers.integrations.accelerate import get_max_memory

        if self.max_memory:
            return {k: int(v) for k, v in get_max_memory(dict(self.max_memory)).items()}
        gpus = None if devices is None else cuda_devices_of(devices)
        if gpus is None:
            return {k: int(v) for k, v in get_max_memory(None).items()}
        return free_memory(gpus)

    def free_bytes(self, device: Any) -> int:
        """What ``device`` (``"cpu"``, ``"cuda:0"`` or a CUDA index) has free now, as the kernel counts
        a budget without ``max_memory`` (:func:`free_memory`); 0 for a device it has no count for
        (a GPU this machine lacks, the CPU beside an integrated GPU, another accelerator)."""
        gpus = cuda_devices_of([device])
        if gpus is None:
            return 0
        return int(free_memory(gpus).get(gpus[0] if gpus else "cpu", 0))

    def infer_device_map(self, *, balanced: bool = True, max_memory: dict | None = None) -> dict[str, Any]:
        """accelerate's placement algorithm (as transformers runs it), fed with loadstone's sizes."""
        from transformers.integrations.accelerate import get_balanced_memory, infer_auto_device_map

        budget = max_memory if max_memory is not None else (dict(self.max_memory) if self.max_memory else None)
        oracle = _SizeOracle(self.tensor_bytes)
        if balanced:
            budget = get_balanced_memory(self.model, max_memory=budget,
                                         no_split_module_classes=self.no_split_module_classes, hf_quantizer=oracle)
        else:
            budget = self.memory_budget() if budget is None else budget
        return dict(infer_auto_device_map(self.model, max_memory=budget,
                                          no_split_module_classes=self.no_split_module_classes, hf_quantizer=oracle))


def local_cuda_device() -> tuple[int, int | None]:
    """:meth:`PlacementContext.local_cuda_device`, for strategies that answer before a context
    exists (``whole_model_device``)."""
    import os

    import torch

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not torch.cuda.is_available():
        return local_rank, None
    if local_rank >= torch.cuda.device_count():
        from .errors import PlacementError

        raise PlacementError(
            f"LOCAL_RANK is {local_rank} but only {torch.cuda.device_count()} CUDA devices are visible.",
            field="LOCAL_RANK", found=local_rank, fix="start one process per visible GPU (torchrun "
            "--nproc-per-node) or fix CUDA_VISIBLE_DEVICES")
    return local_rank, local_rank


def cuda_devices_of(devices: Iterable[Any]) -> list[int] | None:
    """The CUDA indices among device-map values, or ``None`` when one of them is another
    accelerator (``mps``, ``xpu:0`` ...), whose memory only accelerate's detection knows."""
    gpus: set[int] = set()
    for device in devices:
        key = normalize_device(device)
        if isinstance(key, int):
            gpus.add(key)
        elif key not in ("cpu", "disk", "meta"):
            return None
    return sorted(gpus)


#: Memory this load's engine already holds for reading ahead (``Engine.read_ahead``), by device
#: label, while the load is planned: counted as free, since the plan counts it itself (as the
#: engine's ``extra_bytes``). A context variable: loads in other threads hold their own.
HELD_BY_READ_AHEAD: ContextVar[dict[str, int]] = ContextVar("loadstone_held_by_read_ahead", default={})


def cuda_free_bytes(index: int | str) -> int:
    """What a load can take on CUDA device ``index`` (``0`` or ``"cuda:0"``): the bytes CUDA has
    free, plus those torch's caching allocator holds without using them. transformers' ``get_max_memory`` counts them too: a
    process that deleted a model keeps its memory cached, and torch hands it out again. Memory
    allocated outside torch (instanttensor's ring) needs the cache emptied first
    (:func:`~loadstone.engines.instant.room_outside_torch`)."""
    import torch

    cached = torch.cuda.memory_reserved(index) - torch.cuda.memory_allocated(index)
    return int(torch.cuda.mem_get_info(index)[0]) + max(0, int(cached))


def free_memory(gpus: list[int]) -> dict[str | int, int]:
    """Free bytes on each of ``gpus`` (:func:`cuda_free_bytes`, torch's unused cache included) and
    available host memory, as transformers counts them (an integrated GPU shares the host's memory,
    so the CPU then gets no budget of its own), plus what this load holds for reading ahead
    (:data:`HELD_BY_READ_AHEAD`)."""
    import psutil

    held = HELD_BY_READ_AHEAD.get()

    budget: dict[str | int, int] = {}
    integrated = False
    if gpus:
        import torch

        present = torch.cuda.device_count() if torch.cuda.is_available() else 0
        for index in gpus:
            if index >= present:
                continue  # planning for a GPU this machine lacks: no budget to check against
            budget[index] = cuda_free_bytes(index) + held.get(f"cuda:{index}", 0)
            integrated = integrated or bool(getattr(torch.cuda.get_device_properties(index), "is_integrated", False))
    if not integrated:
        budget["cpu"] = int(psutil.virtual_memory().available) + held.get("cpu", 0)
    return budget


class _SizeOracle:
    """Quacks like the one method of transformers' HfQuantizer that its sizing code calls, so
    accelerate's algorithm sees loadstone's per-tensor estimate instead of dtype sizes."""

    def __init__(self, tensor_bytes: dict[str, float]):
        self.tensor_bytes = tensor_bytes

    def param_element_size(self, model: Any, name: str, param: Any) -> float:
        numel = param.numel()
        return self.tensor_bytes.get(name, numel * param.element_size()) / numel if numel else 0.0


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

    def whole_model_device(self, spec: str) -> str | int | None:
        """The one device the whole model goes to, if the spec alone says it (before the model
        exists): a CUDA index (``0``) or a device name (``"cpu"``, ``"mps"``); ``None`` when it
        depends on the model or the memory (the default). The kernel then lets the engine start
        reading before the plan (``Engine.read_ahead``), so :meth:`place` must return exactly
        ``{"": device}`` for it (the conformance kit checks)."""
        return None

    @abstractmethod
    def place(self, ctx: PlacementContext) -> dict[str, Any]:
        """Return a device map: module name prefix -> device (``"cpu"``, ``"disk"``, ``"cuda:0"``, int).

        ``ctx`` gives the meta model, per-module byte sizes after quantization, the memory budget,
        the offload folder, helpers (:meth:`PlacementContext.decoder_layers`,
        :meth:`PlacementContext.tied_groups`, :meth:`PlacementContext.module_bytes`) and
        :meth:`PlacementContext.infer_device_map`, accelerate's algorithm fed with loadstone's
        size estimate.
        """

