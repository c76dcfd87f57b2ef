"""Measuring a loaded model: the bytes it holds at rest, and the peak of a load.

**At rest** (:func:`stored_bytes`): every tensor reachable from the model's parameters, buffers
and modules, each storage counted once. "Reachable" covers what quantization libraries hang off
their parameters and modules besides the tensor itself (bitsandbytes' ``weight.quant_state``
with ``absmax``, ``code`` and a nested state, ``Int8Params.SCB``, a layer's ``state.CB``), so the
figure works for any backend without the backend's help. Tied weights and aliases share one
storage and count once.

**Peak** (:class:`AllocationPeak`): torch's profiler with ``profile_memory=True`` reports every
allocation and free of torch's allocators (pointer, size, device) while it runs. Replaying them
in order gives the bytes live at each moment of the load that were allocated during it; the
highest value is the peak. Precision: exact to the byte for what torch allocates (the storage
size asked for; the C allocator's own rounding and fragmentation are not included), counted
from zero at the start (memory held before is left out, and frees of it do not count). Blind
spots, each detected where it matters: memory torch did not allocate (file pages of a
memory-mapped checkpoint, numpy buffers, Python objects), and allocations in threads other than
the one that entered the block (the profiler records the calling thread only; loadstone's native
engine reads tensors in reader threads). When the model at the end holds more bytes than the
live allocations account for, something was missed, and :meth:`AllocationPeak.complete` says
so. On CUDA devices the caching allocator's own counters (all threads) give the peak as well.

Work done inside ``torch.profiler.record_function("loadstone.conformance:LABEL")`` scopes is
also measured per scope (:attr:`AllocationPeak.scopes`): what the code inside allocated and kept,
and the most it held at once in allocations it freed again. The backend kit labels each
``load_tensor`` call this way (:class:`~loadstone.testing.conformance.conversions.ConversionMeter`),
which runs in the engine's calling thread whatever threads read the tensors.
"""

from __future__ import annotations

from typing import Any, Iterator

__all__ = ["AllocationPeak", "SCOPE_PREFIX", "reachable_tensors", "stored_bytes"]

# Values besides tensors worth comparing between two loads (quantization settings on a state
# object); anything else (modules, configs, functions) is not followed.
_SCALARS = (bool, int, float, str, type(None))
_MAX_DEPTH = 4


def _skip_object(value: Any) -> bool:
    import functools
    import types

    import torch

    if isinstance(value, (torch.nn.Module, type, types.FunctionType, types.MethodType, types.BuiltinFunctionType,
                          functools.partial)):
        return True
    module = type(value).__module__ or ""
    # Configs, quantizers and hooks of transformers/accelerate hold no tensors of the model
    # (offload hooks hold copies of offloaded weights, which the map places elsewhere).
    return module.startswith(("transformers.", "accelerate.", "peft.")) or "Config" in type(value).__name__


def _walk(prefix: str, value: Any, depth: int, seen: set[int]) -> Iterator[tuple[str, Any]]:
    import torch

    if isinstance(value, torch.Tensor):
        yield prefix, value
        # Tensor subclasses (bitsandbytes' Params4bit, Int8Params) carry state as attributes.
        for name, attr in vars(value).items():
            if not name.startswith("_"):
                yield from _walk(f"{prefix}.{name}", attr, depth + 1, seen)
        return
    if isinstance(value, _SCALARS) or isinstance(value, (torch.dtype, torch.device, torch.Size)):
        yield prefix, value
        return
    if depth >= _MAX_DEPTH or id(value) in seen or _skip_object(value):
        return
    seen.add(id(value))
    if isinstance(value, dict):
        items = ((str(k), v) for k, v in value.items())
    elif isinstance(value, (list, tuple)):
        items = ((str(i), v) for i, v in enumerate(value))
    elif hasattr(value, "__dict__"):
        items = ((k, v) for k, v in vars(value).items() if not k.startswith("_"))
    else:
        return
    for name, attr in items:
        yield from _walk(f"{prefix}.{name}", attr, depth + 1, seen)


def reachable_tensors(model: Any) -> dict[str, Any]:
    """Every tensor (and scalar setting) reachable from the model, by a stable dotted path.

    Parameters and buffers under their own names (``model.layers.0.mlp.up_proj.weight``), tied
    ones under each name; attributes of parameters and modules below them
    (``...up_proj.weight.quant_state.absmax``, ``...up_proj.weight.quant_state.blocksize``).
    Two loads of the same model by the same method give the same paths, so comparing these maps
    compares packed weights and quantization state, not only the state dict.
    """
    import torch

    out: dict[str, Any] = {}
    seen: set[int] = set()
    tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, tensor in tensors:
        for path, value in _walk(name, tensor, 0, seen):
            out.setdefault(path, value)
    for module_name, module in model.named_modules(remove_duplicate=False):
        owned = set(module._parameters) | set(module._buffers) | set(module._modules)
        for attr, value in vars(module).items():
            if attr.startswith("_") or attr in owned:
                continue
            if isinstance(value, torch.Tensor) or not isinstance(value, _SCALARS):
                for path, found in _walk(f"{module_name}.{attr}" if module_name else attr, value, 1, seen):
                    if isinstance(found, torch.Tensor):  # module settings are not the load's business
                        out.setdefault(path, found)
    return out


def stored_bytes(model: Any, device: str | None = None) -> int:
    """Bytes the model holds in tensors: every reachable tensor's storage, each storage once
    (meta tensors hold nothing); only those on ``device`` (``"cpu"``, ``"cuda:0"``) if given."""
    import torch

    storages: dict[tuple[str, int], int] = {}
    for value in reachable_tensors(model).values():
        if not isinstance(value, torch.Tensor) or value.device.type == "meta":
            continue
        if device is not None and _label(value.device) != device:
            continue
        try:
            storage = value.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse or nested layouts: count the values
            storages[(str(value.device), id(value))] = value.numel() * value.element_size()
            continue
        storages[(str(value.device), storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())


class AllocationPeak:
    """Peak bytes allocated by torch per device while the ``with`` block runs (see the module
    docstring for the method and its precision).

    >>> with AllocationPeak() as peak:                          # doctest: +SKIP
    ...     model = loadstone.load("./tiny", placement="cpu").model
    >>> peak.peak["cpu"], peak.live["cpu"]                      # doctest: +SKIP

    :ivar peak: device label (``"cpu"``, ``"cuda:0"``) -> highest live bytes during the block.
    :ivar live: device label -> bytes allocated during the block and still live at its end.
    :ivar transient_peak: device label -> the most bytes live at one moment in allocations that
        were freed before the block ended: what was in flight (read buffers, full-precision
        tensors being converted, work tensors), without what the load keeps.
    :ivar allocations: how many allocations the profiler reported (0: nothing was measured).
    :ivar scopes: label of a ``record_function(SCOPE_PREFIX + label)`` block -> ``{"kept": bytes
        allocated inside and still live when it ended, "work": the most bytes live at once inside
        it in allocations it also freed}`` (a label seen twice: kept summed, work the larger).
    """

    method = ("torch.profiler (profile_memory=True): replay of every allocation and free of torch's "
              "allocators in the calling thread, counted from the block's start")

    def __init__(self) -> None:
        self.peak: dict[str, int] = {}
        self.live: dict[str, int] = {}
        self.transient_peak: dict[str, int] = {}
        self.allocations = 0
        self.scopes: dict[str, dict[str, int]] = {}
        self._profile: Any = None
        self._cuda_base: dict[int, int] = {}

    def __enter__(self) -> "AllocationPeak":
        import torch
        from torch.profiler import ProfilerActivity, profile

        if torch.cuda.is_available():
            for index in range(torch.cuda.device_count()):
                torch.cuda.reset_peak_memory_stats(index)
                self._cuda_base[index] = torch.cuda.memory_allocated(index)
        self._profile = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._profile.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._profile.__exit__(*exc)
        if exc[0] is None:
            self._replay(self._profile)
            self._cuda_counters()
        self._profile = None

    def _cuda_counters(self) -> None:
        """The CUDA caching allocator counts every thread's allocations: its peak is complete."""
        import torch

        for index, base in self._cuda_base.items():
            label = f"cuda:{index}"
            self.peak[label] = max(self.peak.get(label, 0), torch.cuda.max_memory_allocated(index) - base)
            self.live[label] = torch.cuda.memory_allocated(index) - base

    def complete(self, model_bytes: int, device: str = "cpu", tolerance: float = 0.05) -> bool:
        """Whether the allocations seen account for a model of ``model_bytes`` loaded inside the
        block: if the model holds more than what is still live, some of it came from elsewhere
        (another thread, a memory map) and the peak may be understated."""
        return self.live.get(device, 0) >= model_bytes * (1 - tolerance)

    def _replay(self, prof: Any) -> None:
        from torch._C._profiler import _EventType

        events = []
        stack = list(prof.profiler.kineto_results.experimental_event_tree())
        while stack:
            event = stack.pop()
            stack.extend(event.children)
            if event.tag == _EventType.Allocation:
                fields = event.extra_fields
                events.append((event.start_time_ns, fields.ptr, int(fields.alloc_size), _label(fields.device),
                               _scope(event)))
        events.sort(key=lambda e: e[0])
        self.allocations = sum(1 for e in events if e[2] > 0)
        for device in {e[3] for e in events}:
            peak, live, in_flight = _replay([e for e in events if e[3] == device])
            self.peak[device], self.live[device], self.transient_peak[device] = peak, live, in_flight
        for label in {e[4] for e in events if e[4] is not None}:
            _, kept, work = _replay([e for e in events if e[4] == label])
            found = self.scopes.setdefault(label, {"kept": 0, "work": 0})
            found["kept"] += kept
            found["work"] = max(found["work"], work)


SCOPE_PREFIX = "loadstone.conformance:"


def _scope(event: Any) -> str | None:
    parent = event.parent
    while parent is not None:
        if parent.name.startswith(SCOPE_PREFIX):
            return parent.name[len(SCOPE_PREFIX):]
        parent = parent.parent
    return None


def _replay(events: list[tuple]) -> tuple[int, int, int]:
    """``(peak, live at the end, transient peak)`` of time-ordered ``(t, ptr, size, ...)`` events:
    a free counts only for a block allocated among them; a block freed among them is transient."""
    freed: set[int] = set()
    open_blocks: dict[int, int] = {}
    for index, (_, ptr, size, *_rest) in enumerate(events):
        if size > 0:
            open_blocks[ptr] = index
        elif ptr in open_blocks:
            freed.add(open_blocks.pop(ptr))
    owned: dict[int, tuple[int, bool]] = {}
    live = peak = in_flight = transient_peak = 0
    for index, (_, ptr, size, *_rest) in enumerate(events):
        if size > 0:
            transient = index in freed
            owned[ptr] = (size, transient)
            live += size
            peak = max(peak, live)
            if transient:
                in_flight += size
                transient_peak = max(transient_peak, in_flight)
        else:
            size, transient = owned.pop(ptr, (0, False))
            live -= size
            in_flight -= size if transient else 0
    return peak, live, transient_peak


def _label(device: Any) -> str:
    """``"cpu"`` or ``"cuda:0"``, as the plan labels devices (a bare ``cuda`` is device 0)."""
    text = str(device)
    if text.startswith("cpu"):
        return "cpu"
    return text if ":" in text or text == "meta" else f"{text}:0"
