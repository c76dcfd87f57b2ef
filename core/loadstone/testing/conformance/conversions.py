"""Measuring a backend's conversions one ``load_tensor`` call at a time.

loadstone's native engine reads tensors in reader threads, which torch's profiler does not see;
the backend converts each one in the engine's calling thread, which it does. The meter wraps the
backend's ``load_tensor`` for the duration of one load: each call runs in its own profiler scope
(see :class:`~loadstone.testing.conformance.AllocationPeak`), and the meter notes the tensor it
was handed, whether the module kept that tensor as its own storage, and a weak reference to it.
A call's bytes in flight are then the handed tensor (unless kept) plus the most the call's own
work tensors held at once, plus earlier handed tensors (not kept) that something still holds when
the call starts: exact, whatever threads read the weights.
"""

from __future__ import annotations

import contextlib
import os
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterator

from .measure import SCOPE_PREFIX, AllocationPeak


@dataclass
class Conversion:
    """One ``load_tensor`` call: ``label`` is ``module.name`` (numbered when a label repeats)."""

    label: str
    nbytes: int
    floating: bool
    kept: bool
    handed: Any = field(repr=False)  # weak reference to the tensor the call was handed
    #: bytes of earlier handed tensors (not kept as storage) still alive when this call began
    earlier_alive: int = 0

    def in_flight(self, peak: AllocationPeak) -> int:
        work = peak.scopes.get(self.label, {}).get("work", 0)
        return work + (0 if self.kept else self.nbytes) + self.earlier_alive


class ConversionMeter:
    """Wraps ``backend.load_tensor`` (an instance attribute, removed again on exit) while a load runs.

    >>> with ConversionMeter(backend) as meter, AllocationPeak() as peak:   # doctest: +SKIP
    ...     loadstone.load(...)
    >>> max(c.in_flight(peak) for c in meter.calls)                        # doctest: +SKIP
    """

    def __init__(self, backend: Any):
        self.backend = backend
        self.calls: list[Conversion] = []

    def __enter__(self) -> "ConversionMeter":
        from torch.profiler import record_function

        original = self.backend.load_tensor
        seen: dict[str, int] = {}

        def load_tensor(module_name: str, module: Any, name: str, tensor: Any, ctx: Any) -> None:
            label = f"{module_name}.{name}"
            seen[label] = seen.get(label, 0) + 1
            label += f"#{seen[label]}" if seen[label] > 1 else ""
            earlier = sum(c.nbytes for c in self.calls if not c.kept and c.handed() is not None)
            with record_function(SCOPE_PREFIX + label):
                original(module_name, module, name, tensor, ctx)
            stored = {t.untyped_storage().data_ptr() for t in [*module.parameters(recurse=False),
                                                               *module.buffers(recurse=False)]
                      if t.device.type != "meta"}
            kept = tensor.device.type != "meta" and tensor.untyped_storage().data_ptr() in stored
            self.calls.append(Conversion(label, tensor.numel() * tensor.element_size(), tensor.is_floating_point(),
                                         kept, weakref.ref(tensor), earlier))

        self.backend.load_tensor = load_tensor
        return self

    def __exit__(self, *exc: object) -> None:
        vars(self.backend).pop("load_tensor", None)

    def handed_and_still_alive(self) -> list[str]:
        """Calls whose handed tensor, not kept as the module's storage, is still alive: something
        (the backend, ``ctx.state``) holds a copy the plan does not count."""
        return [c.label for c in self.calls if not c.kept and c.handed() is not None]


@contextlib.contextmanager
def sequential_transformers_loading() -> Iterator[None]:
    """transformers' ``from_pretrained`` reads tensors in the calling thread while this runs
    (``HF_DEACTIVATE_ASYNC_LOAD=1``), so that :class:`AllocationPeak` sees its allocations."""
    saved = os.environ.get("HF_DEACTIVATE_ASYNC_LOAD")
    os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = "1"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("HF_DEACTIVATE_ASYNC_LOAD", None)
        else:
            os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = saved
