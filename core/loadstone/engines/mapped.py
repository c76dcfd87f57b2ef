"""The native engine's ``reader=mmap`` pass: CPU tensors handed over as views of their files.

A tensor kept on the CPU as stored becomes a copy-on-write view of its file's pages, as
``from_pretrained`` keeps CPU weights. A weight that only passes through the CPU on its way to
being packed (an NF4 or int8 weight quantized there) is quantized straight from such a view too:
copying it out of the page cache first cost the 2-core machine as much time as reading it, and
competed for the cores with the quantization. Its pages are given back to the system as soon as
the backend has packed it (:meth:`SafetensorsReader.give_back`), so the load holds one such weight
at a time, not the whole checkpoint; a weight the model holds after all (a backend that keeps it as
it is) is kept and protected like any other mapped tensor.
"""

from __future__ import annotations

import bisect
from typing import Any, Callable

from ..contract.engines import EngineContext
from ..contract.plan import Plan
from ..contract.tensors import TensorGroup
from ..contract.units import format_size
from .reader import SafetensorsReader
from .streaming import StreamItem

# group(owner, [tensor]): the engine hands one group's tensors to the backend
HandOver = Callable[[Any, list[Any]], None]


def hand_over_mapped(plan: Plan, ctx: EngineContext, reader: SafetensorsReader, items: list[StreamItem],
                     owners: dict[int, Any], model: Any, hand_over: HandOver, progress: Any) -> list[StreamItem]:
    """Hands every CPU tensor that can be a view of its file over as one (a group of one tensor, no
    cast on the host); returns the items left to stream."""
    left, passing = [], []
    views = kept = 0  # tensors kept on the CPU as views, and their bytes
    unleased = plan.engine_options.get("unleased", "map")
    # packed checkpoints' tensors are the backend's to keep as they are: never given back
    packs = not plan.quantization.pre_quantized
    for item in items:
        owner = owners[id(item)]
        mappable = (item.device == "cpu" and item.cast_to is None and isinstance(owner, TensorGroup)
                    and len(owner.sources) == 1 and (not item.transient or packs))
        tensor = reader.map(item.info, unleased=unleased, passing=item.transient) if mappable else None
        if tensor is None:
            left.append(item)
            continue
        where = (tensor.data_ptr(), tensor.data_ptr() + item.info.nbytes)
        hand_over(owner, [tensor])
        tensor = None
        if item.transient:
            passing.append((where, item.info))
            reader.give_back(item.info)
        else:
            views, kept = views + 1, kept + item.info.nbytes
        progress(item.info.nbytes)
    held = _held_by_model(model, passing)
    for info in held:
        reader.keep(info)
    _note(ctx, reader, views + len(held), kept, len(passing) - len(held))
    return left


def _held_by_model(model: Any, passing: list[tuple[tuple[int, int], Any]]) -> list[Any]:
    """The passing tensors whose bytes a tensor of the model still uses (storage ranges overlap)."""
    if not passing:
        return []
    passing.sort(key=lambda p: p[0][0])
    starts = [where[0] for where, _ in passing]
    held: dict[str, Any] = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.device.type != "cpu" or not tensor.numel():
            continue
        storage = tensor.untyped_storage()
        low, high = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
        i = bisect.bisect_right(starts, high - 1) - 1
        while i >= 0 and passing[i][0][1] > low:
            held[passing[i][1].name] = passing[i][1]
            i -= 1
    return list(held.values())


def _note(ctx: EngineContext, reader: SafetensorsReader, views: int, kept: int, packed: int) -> None:
    files = reader.mapped_files
    leased = sorted(p.name for p, (how, _) in files.items() if how == "leased")
    if views or packed:
        ctx.note(f"engine loadstone: {views} tensors ({format_size(kept)}) are copy-on-write views of the checkpoint "
                 f"files (reader=mmap)"
                 + (f", {packed} weights were packed straight from their files' pages, which were given back once "
                    "packed" if packed else "")
                 + (f"; {len(leased)} of {len(files)} files under a read lease: a process that rewrites or "
                    "truncates one waits while the model's bytes are copied out of it" if leased else ""))
    else:
        ctx.note("engine loadstone: reader=mmap mapped no tensor: each is cast, converted, placed off the CPU, "
                 "unaligned in its file or in a file that was read, and was read")
    for path, (how, why) in sorted(files.items()):
        if how == "unprotected":
            ctx.note(f"engine loadstone: {path.name} is mapped with no lease ({why}): rewriting it in place "
                     "changes or kills the model (unleased=read copies such a file instead)")
        elif how == "read":
            ctx.note(f"engine loadstone: {path.name} was read, not mapped: no lease ({why})")
