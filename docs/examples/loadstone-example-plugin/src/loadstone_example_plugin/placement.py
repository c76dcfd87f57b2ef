"""The ``memory-fraction[:F]`` placement strategy: ``auto`` placement inside a fraction of each
device's memory budget.

Fine-tuning needs memory beyond the weights: activations, LoRA optimizer state, the CUDA
caching allocator's slack. ``placement="auto"`` fills each accelerator up to its free memory;
``placement="memory-fraction:0.8"`` lets the weights take at most 80 % of each device's budget
(the user's ``max_memory``, else what is free) and spills the rest to the next device, the CPU,
or the offload folder, exactly as ``auto`` would. ``memory-fraction`` alone means 0.9.
"""

from __future__ import annotations

from typing import Any

from loadstone import PlacementContext, PlacementError, PlacementStrategy, hookimpl

DEFAULT_FRACTION = 0.9


def parse_fraction(spec: str, prefix: str = "memory-fraction") -> float:
    """``"memory-fraction:0.8"`` -> 0.8, ``"memory-fraction:80%"`` -> 0.8, ``"memory-fraction"`` -> 0.9."""
    _, sep, text = spec.partition(":")
    if not sep:
        return DEFAULT_FRACTION
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 1:
        raise PlacementError(f"cannot read the fraction in placement {spec!r}.", field="placement",
                             expected=f"{prefix}:F with 0 < F <= 1, e.g. {prefix}:0.8 or {prefix}:80%",
                             found=text, fix=f"write e.g. placement=\"{prefix}:0.8\"")
    return value


class MemoryFractionPlacement(PlacementStrategy):
    name = "memory-fraction"
    description = "auto placement within a fraction of each device's budget, e.g. memory-fraction:0.8"

    def matches(self, spec: str) -> bool:
        return spec == self.name or spec.startswith(self.name + ":")

    def place(self, ctx: PlacementContext) -> dict[str, Any]:
        fraction = parse_fraction(ctx.spec, self.name)
        budget = ctx.memory_budget()  # the user's max_memory, else free memory per device
        scaled = {device: int(nbytes * fraction) for device, nbytes in budget.items()}
        ctx.note(f"{fraction:.0%} of each device's budget: "
                 + ", ".join(f"{_label(d)} {n / 2**20:.1f} MiB" for d, n in scaled.items()))
        return ctx.infer_device_map(balanced=True, max_memory=scaled)


def _label(device: Any) -> str:
    return f"cuda:{device}" if isinstance(device, int) else str(device)


@hookimpl
def loadstone_register_placement_strategies(register):
    register(MemoryFractionPlacement())
