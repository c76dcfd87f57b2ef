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
the one that entered the block (the profiler records the calling thread only). When the model
at the end holds more bytes than the live allocations account for, something was missed, and
:attr:`AllocationPeak.complete` says so.
"""

from __future__ import annotations

import os
from typing import Any, Iterator

__all__ = ["AllocationPeak", "reachable_tensors", "stored_bytes"]

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
    """

    method = ("torch.profiler (profile_memory=True): replay of every allocation and free of torch's "
              "allocators in the calling thread, counted from the block's start")

    def __init__(self) -> None:
        self.peak: dict[str, int] = {}
        self.live: dict[str, int] = {}
        self.transient_peak: dict[str, int] = {}
        self.allocations = 0
        self._profile: Any = None

    def __enter__(self) -> "AllocationPeak":
        from torch.profiler import ProfilerActivity, profile

        self._profile = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._profile.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._profile.__exit__(*exc)
        if exc[0] is None:
            self._replay(self._profile)
        self._profile = None

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
                events.append((event.start_time_ns, fields.ptr, int(fields.alloc_size), _label(fields.device)))
        events.sort(key=lambda e: e[0])
        # First pass: which allocations are freed inside the block (work tensors, buffers in
        # flight) and which survive it (what the load keeps).
        freed: set[int] = set()
        open_blocks: dict[tuple[str, int], int] = {}
        for index, (_, ptr, size, device) in enumerate(events):
            if size > 0:
                open_blocks[(device, ptr)] = index
            elif (device, ptr) in open_blocks:
                freed.add(open_blocks.pop((device, ptr)))
        owned: dict[tuple[str, int], tuple[int, bool]] = {}
        live: dict[str, int] = {}
        in_flight: dict[str, int] = {}
        for index, (_, ptr, size, device) in enumerate(events):
            if size > 0:
                self.allocations += 1
                transient = index in freed
                owned[(device, ptr)] = (size, transient)
                live[device] = live.get(device, 0) + size
                self.peak[device] = max(self.peak.get(device, 0), live[device])
                if transient:
                    in_flight[device] = in_flight.get(device, 0) + size
                    self.transient_peak[device] = max(self.transient_peak.get(device, 0), in_flight[device])
            else:  # a free: only blocks allocated inside the block count
                size, transient = owned.pop((device, ptr), (0, False))
                live[device] = live.get(device, 0) - size
                if transient:
                    in_flight[device] -= size
        self.live = dict(live)


def _label(device: Any) -> str:
    """``"cpu"`` or ``"cuda:0"``, as the plan labels devices (a bare ``cuda`` is device 0)."""
    text = str(device)
    if text.startswith("cpu"):
        return "cpu"
    return text if ":" in text or text == "meta" else f"{text}:0"


def sequential_transformers_loading() -> Any:
    """A context in which transformers' ``from_pretrained`` reads tensors in the calling thread
    (``HF_DEACTIVATE_ASYNC_LOAD=1``), so that :class:`AllocationPeak` sees its allocations."""
    import contextlib

    @contextlib.contextmanager
    def env() -> Iterator[None]:
        saved = os.environ.get("HF_DEACTIVATE_ASYNC_LOAD")
        os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = "1"
        try:
            yield
        finally:
            if saved is None:
                os.environ.pop("HF_DEACTIVATE_ASYNC_LOAD", None)
            else:
                os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = saved

    return env()
