"""The ``even`` and ``layers:N`` placement strategies: decoder layers split evenly by bytes (after
quantization) over the GPUs, embeddings and head where they cost least, ``max_memory`` respected.

Which GPUs: the CUDA devices ``max_memory`` gives a budget to (so that a CPU machine can plan for
a bigger one), else every visible one; ``layers:N`` takes the first N of them. When the GPUs
cannot hold the model, the fewest trailing layers go to the CPU (within its budget) and then to
the offload folder.
"""

from __future__ import annotations

from typing import Any

from loadstone import PlacementContext, PlacementError, PlacementStrategy

from .resolve import listing, model_tensors, owner
from .rules import device_label
from .split import Block, Device, Split, spill, split_layers
from .units import size


def visible_gpus(ctx: PlacementContext) -> list[int]:
    """CUDA indices to split over: those ``max_memory`` budgets, else every visible one."""
    budgeted = sorted(k for k in (ctx.max_memory or {}) if isinstance(k, int))
    if budgeted:
        return budgeted
    import torch

    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []


def gpu_budget(ctx: PlacementContext, gpus: list[int]) -> list[Device]:
    budget = ctx.max_memory or {}
    devices = []
    for index in gpus:
        if index in budget:
            devices.append(Device(index, int(budget[index])))
        else:  # visible, not budgeted: what is free on it now, as the kernel counts it
            devices.append(Device(index, ctx.free_bytes(index)))
    return devices


def offload_devices(ctx: PlacementContext) -> list[Device]:
    """Where layers the GPUs cannot hold go, as accelerate's auto map would send them: the CPU
    (its ``max_memory`` entry; without ``max_memory`` what is free), then the offload folder."""
    out = []
    if ctx.max_memory is None:
        cpu = ctx.memory_budget().get("cpu")
        if cpu is not None:
            out.append(Device("cpu", int(cpu)))
    elif "cpu" in ctx.max_memory:
        out.append(Device("cpu", int(ctx.max_memory["cpu"])))
    if ctx.offload_folder:
        out.append(Device("disk", None))
    return out


class Blocks:
    """The model cut into placement blocks: each decoder layer, the input block (modules before
    the first layer) and the output block (after the last); modules between layers travel with
    the layer before them."""

    def __init__(self, ctx: PlacementContext):
        layers = ctx.decoder_layers()
        if not layers:
            raise PlacementError(
                f"{type(ctx.model).__name__} declares no repeated decoder layers (_no_split_modules), so there is "
                f"nothing to split evenly.", field="placement", found=ctx.spec,
                fix="use placement='auto' or a device-map file (placement='file:map.yaml')")
        order = {name: i for i, (name, _) in enumerate(ctx.model.named_modules())}
        layer_at = sorted((order[name], name) for name in layers)
        members: dict[str, list[str]] = {name: [name] for name in layers}
        before, after = [], []
        for tensor in model_tensors(ctx.model):
            key = owner(tensor) or tensor
            if any(tensor.startswith(layer + ".") for layer in layers):
                continue
            position = order.get(key, -1)
            if position < layer_at[0][0]:
                target = before
            elif position > layer_at[-1][0]:
                target = after
            else:  # between two layers: with the layer before it
                target = members[max((pos, name) for pos, name in layer_at if pos < position)[1]]
            if key not in target:
                target.append(key)
        for names in (before, after, *members.values()):
            names.sort(key=lambda n: order.get(n, order.get(owner(n), -1)))
        self.tied_ends = self._tied_ends(ctx, before, after, layers)
        self.layers = [self._block(ctx, members[name]) for _, name in layer_at]
        self.input = self._block(ctx, before) if before else None
        self.output = self._block(ctx, after) if after else None

    @staticmethod
    def _tied_ends(ctx: PlacementContext, before: list[str], after: list[str], layers: list[str]) -> bool:
        tied = False
        for group in ctx.tied_groups():
            owners = {owner(n) for n in group}
            sides = {"in" if o in before else "out" if o in after else "layer" for o in owners}
            if "layer" in sides and len(sides) > 1:
                raise PlacementError(
                    f"tied weights {', '.join(sorted(group))} join a decoder layer to another block; an even split "
                    f"cannot keep them together.", field="placement", found=ctx.spec,
                    fix="write a device-map file (placement='file:map.yaml') that puts them on one device")
            tied = tied or sides == {"in", "out"}
        return tied

    @staticmethod
    def _block(ctx: PlacementContext, names: list[str]) -> Block:
        def under(tensor: str) -> bool:
            return any(tensor == n or tensor.startswith(n + ".") for n in names)

        nbytes = sum(ctx.module_bytes(n) for n in names)
        transient = max((int(b) for t, b in ctx.transient_bytes.items() if under(t)), default=0)
        return Block(tuple(names), int(nbytes), transient)


def device_map_of(blocks: Blocks, split: Split) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if blocks.input is not None:
        out.update(dict.fromkeys(blocks.input.names, split.input))
    for block, device in zip(blocks.layers, split.layers):
        out.update(dict.fromkeys(block.names, device))
    if blocks.output is not None:
        out.update(dict.fromkeys(blocks.output.names, split.input if blocks.tied_ends else split.output))
    return out


def even_split(ctx: PlacementContext, gpus: list[int]) -> dict[str, Any]:
    blocks = Blocks(ctx)
    devices = gpu_budget(ctx, gpus)
    ends = dict(input_block=blocks.input, output_block=blocks.output, tied_ends=blocks.tied_ends)
    names = ", ".join(device_label(g) for g in gpus)
    split = split_layers(blocks.layers, devices, **ends)
    if split is None:
        split = spill(blocks.layers, devices, offload_devices(ctx), **ends)
        if split is not None:
            moved = [b.names[0] for b, d in zip(blocks.layers, split.layers) if d in ("cpu", "disk")]
            where = sorted({device_label(d) for d in split.layers if d in ("cpu", "disk")})
            ctx.note(f"{names} cannot hold every layer within their budgets: {len(moved)} trailing layer(s) go to "
                     f"{' and '.join(where)} ({listing(moved, 3)})")
    if split is None:  # nothing fits: the even split regardless of budgets; the plan reports the overflow
        split = split_layers(blocks.layers, [Device(d.label, None) for d in devices], **ends)
        assert split is not None
        ctx.note(f"the model does not fit {names} within their budgets (nor spilled to cpu/disk); the even split "
                 f"is shown regardless")
    on_gpus = {d: n for d, n in split.loads.items() if d not in ("cpu", "disk")}
    ctx.note(f"{len(blocks.layers)} decoder layers split evenly by bytes over {names} (largest share "
             f"{size(max(on_gpus.values(), default=0))}, smallest {size(min(on_gpus.values(), default=0))}); "
             + (f"tied embeddings and head on {device_label(split.input)}" if blocks.tied_ends else
                "; ".join(part for part in (
                    f"embeddings on {device_label(split.input)}" if blocks.input else "",
                    f"head on {device_label(split.output)}" if blocks.output else "") if part)))
    return device_map_of(blocks, split)


class EvenPlacement(PlacementStrategy):
    name = "even"
    description = "decoder layers split evenly by bytes over every GPU (or those max_memory budgets)"

    def place(self, ctx: PlacementContext) -> dict[str, Any]:
        gpus = visible_gpus(ctx)
        if not gpus:
            raise PlacementError(
                "placement 'even' splits the model over GPUs, and none is visible.", field="placement",
                expected="CUDA devices, or max_memory budgets for them", found="no GPU",
                fix="plan for a machine with GPUs by giving them budgets: max_memory={'cuda:0': '40GiB', 'cuda:1': "
                    "'40GiB'} (CLI: --max-memory cuda:0=40GiB --max-memory cuda:1=40GiB), or use placement='cpu'")
        return even_split(ctx, gpus)


class LayersPlacement(PlacementStrategy):
    name = "layers"
    description = "layers:N: decoder layers split evenly by bytes over the first N GPUs"

    def matches(self, spec: str) -> bool:
        return spec == self.name or spec.startswith(self.name + ":")

    def place(self, ctx: PlacementContext) -> dict[str, Any]:
        _, _, text = str(ctx.spec).partition(":")
        if not text.strip().isdigit() or int(text) < 1:
            raise PlacementError(f"cannot read the number of GPUs in placement {ctx.spec!r}.", field="placement",
                                 expected="layers:N with N >= 1, e.g. layers:2", found=ctx.spec,
                                 fix="write placement='layers:2' (or 'even' for every GPU)")
        count = int(text)
        gpus = visible_gpus(ctx)
        if len(gpus) < count:
            raise PlacementError(
                f"placement {ctx.spec!r} splits over {count} GPUs, but {len(gpus) or 'none'} "
                f"{'is' if len(gpus) == 1 else 'are'} visible or budgeted ({', '.join(map(device_label, gpus)) or '-'}).",
                field="placement", expected=f"at least {count} GPUs", found=len(gpus),
                fix=f"use layers:{len(gpus)}" if gpus else "plan for GPUs with max_memory budgets for them, e.g. "
                f"--max-memory cuda:0=40GiB --max-memory cuda:1=40GiB")
        return even_split(ctx, gpus[:count])
