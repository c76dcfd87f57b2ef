"""Splitting decoder layers over GPUs evenly by bytes: the arithmetic, free of torch and models.

The layers stay in order and each GPU takes a contiguous run of them (hidden states then cross
each device boundary once per forward). The input block (embeddings) and the output block
(final norm and head) may go to any GPU; a tied embedding and head form one block. Among all
choices the split minimises the largest number of bytes any GPU holds, within every GPU's
budget (resting bytes plus the largest tensor in flight while loading). Ties prefer the input
block on the first GPU and the output block on the last, which keeps the forward pass moving in
one direction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence


@dataclass(frozen=True)
class Block:
    """Modules placed together: a decoder layer, or the input or output block.

    :ivar names: device-map keys (module names).
    :ivar nbytes: resting bytes after quantization.
    :ivar transient: the largest tensor in flight while one of them loads.
    """

    names: tuple[str, ...]
    nbytes: int
    transient: int = 0


@dataclass(frozen=True)
class Device:
    label: Any  # a CUDA index or "cpu"/"disk"
    budget: int | None  # None: unlimited (disk)


@dataclass
class Split:
    """Which device each block goes to, and what each device then holds."""

    layers: list[Any]  # device per layer, in order
    input: Any = None
    output: Any = None
    loads: dict[Any, int] = field(default_factory=dict)
    peaks: dict[Any, int] = field(default_factory=dict)

    @property
    def largest(self) -> int:
        return max(self.loads.values(), default=0)


def _fill(layers: Sequence[Block], gpus: Sequence[Device], fixed: dict[Any, int], fixed_peak: dict[Any, int],
          limit: int) -> list[Any] | None:
    """Give each GPU in turn as many of the next layers as fit under ``limit`` bytes and its budget;
    ``None`` if some layers are left over. Filling greedily is optimal for a contiguous split:
    taking fewer layers on an earlier GPU never lets a later one take fewer."""
    out: list[Any] = []
    i = 0
    for gpu in gpus:
        load, peak = fixed.get(gpu.label, 0), fixed_peak.get(gpu.label, 0)
        while i < len(layers):
            layer = layers[i]
            new_load, new_peak = load + layer.nbytes, max(peak, layer.transient)
            if new_load > limit or (gpu.budget is not None and new_load + new_peak > gpu.budget):
                break
            load, peak = new_load, new_peak
            out.append(gpu.label)
            i += 1
    return out if i == len(layers) else None


def _tally(layers: Sequence[Block], placement: list[Any], extra: dict[Any, list[Block]],
           devices: Sequence[Any]) -> tuple[dict[Any, int], dict[Any, int]]:
    loads = {d: 0 for d in devices}
    peaks = {d: 0 for d in devices}
    for block, device in [*zip(layers, placement), *((b, d) for d, bs in extra.items() for b in bs)]:
        loads[device] = loads.get(device, 0) + block.nbytes
        peaks[device] = max(peaks.get(device, 0), block.transient)
    return loads, {d: loads[d] + peaks[d] for d in loads}


def split_layers(layers: Sequence[Block], gpus: Sequence[Device], *, input_block: Block | None = None,
                 output_block: Block | None = None, tied_ends: bool = False) -> Split | None:
    """The most even split of ``layers`` over ``gpus`` with the end blocks placed where they cost
    least, or ``None`` when no split fits the budgets. ``tied_ends``: both end blocks are one (they
    share a tensor) and go to the same GPU."""
    if not gpus:
        return None
    labels = [g.label for g in gpus]
    best: tuple[tuple, Split] | None = None
    first, last = labels[0], labels[-1]
    candidates = [(d, d) for d in labels] if tied_ends else [(a, b) for a in labels for b in labels]
    for at_in, at_out in candidates:
        ends: dict[Any, list[Block]] = {}
        for block, device in ((input_block, at_in), (output_block, at_out)):
            if block is not None:
                ends.setdefault(device, []).append(block)
        fixed = {d: sum(b.nbytes for b in bs) for d, bs in ends.items()}
        fixed_peak = {d: max(b.transient for b in bs) for d, bs in ends.items()}
        if any(g.budget is not None and fixed.get(g.label, 0) + fixed_peak.get(g.label, 0) > g.budget for g in gpus):
            continue
        total = sum(b.nbytes for b in layers) + sum(fixed.values())
        low = max([max(fixed.values(), default=0), max((b.nbytes for b in layers), default=0), -(-total // len(gpus))])
        high = total
        if _fill(layers, gpus, fixed, fixed_peak, high) is None:
            continue
        while low < high:  # the smallest limit under which every layer finds a GPU
            mid = (low + high) // 2
            if _fill(layers, gpus, fixed, fixed_peak, mid) is None:
                low = mid + 1
            else:
                high = mid
        placement = _fill(layers, gpus, fixed, fixed_peak, high)
        assert placement is not None
        loads, peaks = _tally(layers, placement, ends, labels)
        split = Split(placement, at_in if input_block else None, at_out if output_block else None, loads, peaks)
        key = (split.largest, (at_in != first) + (at_out != last), sorted(loads.values(), reverse=True))
        if best is None or key < best[0]:
            best = (key, split)
    return best[1] if best else None


def spill(layers: Sequence[Block], gpus: Sequence[Device], offload: Sequence[Device], *,
          input_block: Block | None = None, output_block: Block | None = None,
          tied_ends: bool = False) -> Split | None:
    """When the GPUs cannot hold every layer: the fewest trailing layers move to the ``offload``
    devices in order (cpu, then disk), each filled up to its budget, and the rest is split evenly
    over the GPUs. ``None`` if even that does not fit."""
    def on_gpus(kept: int) -> Split | None:
        return split_layers(layers[:kept], gpus, input_block=input_block, output_block=output_block,
                            tied_ends=tied_ends)

    if on_gpus(0) is None:
        return None
    low, high = 0, len(layers)  # on_gpus(low) fits; find the most layers that do
    while low < high:
        mid = (low + high + 1) // 2
        if on_gpus(mid) is None:
            high = mid - 1
        else:
            low = mid
    split = on_gpus(low)
    assert split is not None
    rest = list(layers[low:])
    for device in offload:
        load = peak = 0
        while rest and (device.budget is None or load + rest[0].nbytes + max(peak, rest[0].transient) <= device.budget):
            load, peak = load + rest[0].nbytes, max(peak, rest[0].transient)
            split.layers.append(device.label)
            rest.pop(0)
        if load:
            split.loads[device.label] = load
            split.peaks[device.label] = load + peak
    return split if not rest else None
