"""Stage 7, report: count what was loaded (the rest of the report fills in as the stages run)."""

from __future__ import annotations

from typing import Any


def count_parameters(model: Any) -> dict[str, Any]:
    """Parameter counts; packed quantized tensors count the weights they hold, not storage elements."""
    total = trainable = 0
    for param in model.parameters():
        state = getattr(param, "quant_state", None)
        shape = getattr(state, "shape", None)
        n = 1
        if shape is not None:
            for d in shape:
                n *= int(d)
        else:
            n = param.numel()
        total += n
        if param.requires_grad:
            trainable += n
    return {"total": total, "trainable": trainable, "frozen": total - trainable,
            "trainable_percent": (100.0 * trainable / total) if total else 0.0}
