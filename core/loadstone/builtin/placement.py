"""Built-in placement strategies: auto/balanced, sequential, cpu, one named device, rank, explicit maps."""

from __future__ import annotations

import os
from typing import Any

from ..contract.errors import PlacementError
from ..contract.hookspecs import hookimpl
from ..contract.placement import PlacementContext, PlacementStrategy, local_cuda_device, map_entry
from ..contract.units import device_label, is_device_spec, normalize_device


class AutoPlacement(PlacementStrategy):
    name = "auto"
    description = "balance over accelerators, then offload to CPU, then disk (what transformers calls auto)"

    def place(self, ctx: PlacementContext) -> dict[str, Any]:
        return ctx.infer_device_map(balanced=True)


class BalancedPlacement(AutoPlacement):
    name = "balanced"
    description = "the same layers-per-accelerator balance as auto, named explicitly"


class SequentialPlacement(PlacementStrategy):
    name = "sequential"
    description = "fill accelerator 0, then 1, ..., then CPU, then disk"

    def place(self, ctx: PlacementContext) -> dict[str, Any]:
        return ctx.infer_device_map(balanced=False)


class CpuPlacement(PlacementStrategy):
    name = "cpu"
    description = "everything in host memory"

    def whole_model_device(self, spec: str) -> str:
        return "cpu"

    def place(self, ctx: PlacementContext) -> dict[str, Any]:
        return {"": "cpu"}


def _check_device_exists(device: Any, spec: str) -> None:
    import torch

    if isinstance(device, int):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if device >= count:
            raise PlacementError(
                f"{spec} names CUDA device {device}, but this machine has {count}.", field="placement",
                expected=f"cuda:0 .. cuda:{count - 1}" if count else "a machine with a CUDA GPU",
                found=device_label(device), fix="pick an existing device, or placement='cpu' / 'auto'")
    elif device == "mps" and not torch.backends.mps.is_available():
        raise PlacementError(f"{spec} needs Apple's Metal backend, which is not available here.",
                             field="placement", found=device_label(device), fix="use placement='cpu' or 'auto'")
    elif isinstance(device, str) and device.split(":")[0] in {"xpu", "npu", "hpu", "mlu"}:
        backend = getattr(torch, device.split(":")[0], None)
        if backend is None or not backend.is_available():
            raise PlacementError(f"{spec} needs a {device.split(':')[0]} device, which is not available.",
                                 field="placement", found=device_label(device), fix="use placement='cpu' or 'auto'")


class DevicePlacement(PlacementStrategy):
    name = "device"
    description = "the whole model on one named device: cuda:0, cuda:1, mps, xpu:0 ..."

    def matches(self, spec: str) -> bool:
        return is_device_spec(spec) and spec not in {"cpu", "meta"}

    def whole_model_device(self, spec: str) -> str | int | None:
        # The manager hands this strategy its own name too ("device"), which names no device:
        # place() refuses it, so nothing may be read ahead onto it.
        return normalize_device(spec) if self.matches(spec) else None

    def place(self, ctx: PlacementContext) -> dict[str, Any]:
        if not isinstance(ctx.spec, str) or not self.matches(ctx.spec):
            raise PlacementError(
                f"placement {ctx.spec!r} is not a device: the built-in strategy {self.name!r} is chosen by "
                f"naming the device itself.", field="placement", found=ctx.spec,
                expected="a device such as cuda:0, cuda:1, mps, xpu:0",
                fix="pass the device (CLI: --placement cuda:0), or placement='auto' / 'cpu'")
        device = normalize_device(ctx.spec)
        _check_device_exists(device, f"placement {ctx.spec!r}")
        return {"": device}


class RankPlacement(PlacementStrategy):
    name = "rank"
    description = "one full copy per process on cuda:$LOCAL_RANK (the DDP QLoRA layout); CPU without CUDA"

    def whole_model_device(self, spec: str) -> str | int | None:
        try:
            _, cuda = local_cuda_device()  # what place() uses
        except (PlacementError, ValueError):
            return None  # place() says what is wrong with LOCAL_RANK
        return "cpu" if cuda is None else cuda

    def place(self, ctx: PlacementContext) -> dict[str, Any]:
        local_rank, cuda = ctx.local_cuda_device()
        world = os.environ.get("WORLD_SIZE", "1")
        where = f"LOCAL_RANK={local_rank}, RANK={os.environ.get('RANK', '0')}, WORLD_SIZE={world}"
        if cuda is not None:
            ctx.note(f"{where} -> cuda:{cuda}")
            return {"": cuda}
        ctx.note(f"{where}; no CUDA device, so each process keeps its copy on the CPU")
        return {"": "cpu"}


def _check_tied_weights_together(model: Any, spec: dict[str, Any]) -> None:
    """Tied weights (GPT-2's lm_head and wte) are one tensor: a map that splits them makes accelerate
    crash while dispatching, or serve a disk copy that was never written."""
    for target, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        entries = [map_entry(target, spec), map_entry(source, spec)]
        if None in entries or spec[entries[0]] == spec[entries[1]]:
            continue
        where = [f"{name} -> {device_label(spec[entry])} (entry {entry!r})"
                 for name, entry in zip((target, source), entries)]
        raise PlacementError(
            f"the device map puts tied weights on different devices: {target} is {source} (one tensor).",
            field="placement", expected="both on the same device", found="; ".join(where),
            fix=f"map {target.rpartition('.')[0]!r} and {source.rpartition('.')[0]!r} to the same device")


class ExplicitPlacement(PlacementStrategy):
    name = "explicit"
    description = "a device map given as a dict (module prefix -> device); checked against the model"

    def place(self, ctx: PlacementContext) -> dict[str, Any]:
        if not isinstance(ctx.spec, dict):
            # Reached by name ("explicit"); an empty map would fail later as "does not place X".
            raise PlacementError(
                f"placement {ctx.spec!r} needs the device map itself, not the name of this strategy.",
                field="placement", found=ctx.spec, expected="a dict {module: device}",
                fix='pass placement={"": "cpu", "lm_head": 0} (CLI: --device-map map.json)')
        spec = ctx.spec
        names = {n for n, _ in ctx.model.named_modules()} | set(ctx.tensor_bytes)
        unknown = [k for k in spec if k and k not in names]
        if unknown:
            raise PlacementError(
                f"the device map names modules the model does not have: {', '.join(unknown[:6])}.",
                field="placement", expected="module names such as " + ", ".join(sorted(n for n in names if n.count(".") == 1)[:4]),
                found=", ".join(unknown[:6]), fix="fix the names (print(model) shows them) or use \"\" for everything")
        _check_tied_weights_together(ctx.model, spec)
        for key, device in spec.items():
            if device not in ("cpu", "disk"):
                # Name the entry as the user wrote it: "device map entry 'lm_head' -> cuda:1".
                _check_device_exists(device, f"device map entry {key!r} -> {device_label(device)}")
        return _partition(ctx.model, spec)


def _partition(model: Any, spec: dict[str, Any]) -> dict[str, Any]:
    """The same placement with no entry inside another. ``{"": "cpu", "model.layers": "disk"}``
    means "everything on the CPU except the layers" (the longest prefix wins, see map_entry), but
    accelerate's dispatch takes a map's entries as disjoint blocks and fails on nested ones ("weight
    is on the meta device"); an entry that contains others is replaced by its children."""
    nested = {k for k in spec if any(o != k and (k == "" or o.startswith(k + ".")) for o in spec)}
    if not nested:
        return dict(spec)
    modules = dict(model.named_modules())
    out: dict[str, Any] = {}

    def assign(name: str) -> None:
        inside = name == "" or any(k.startswith(name + ".") for k in spec)
        if not inside or name not in modules:
            out[name] = spec[map_entry(name, spec)]
            return
        module = modules[name]
        children = [n for n, _ in module.named_children()]
        tensors = [n for n, _ in module.named_parameters(recurse=False)] + [n for n, _ in module.named_buffers(recurse=False)]
        for child in children + tensors:
            assign(f"{name}.{child}" if name else child)

    assign("")
    return out


@hookimpl
def loadstone_register_placement_strategies(register):
    for strategy in (AutoPlacement(), BalancedPlacement(), SequentialPlacement(), CpuPlacement(),
                     DevicePlacement(), RankPlacement(), ExplicitPlacement()):
        register(strategy)
