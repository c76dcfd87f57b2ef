"""Built-in quantization backend ``none``: load the weights as they are stored."""

from __future__ import annotations

from typing import Any

from ..components import QuantizationBackend, QuantizationContext
from ..hookspecs import hookimpl


class NoQuantization(QuantizationBackend):
    name = "none"
    methods = ("none",)
    description = "no quantization: parameters in the chosen dtype"

    def transformers_config(self, ctx: QuantizationContext) -> Any:
        return None

    def prepare_for_training(self, model: Any, ctx: QuantizationContext) -> list[str]:
        notes = []
        if ctx.request is not None and ctx.request.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            notes.append("gradient checkpointing enabled (use_reentrant=False)")
        return notes


@hookimpl
def loadstone_register_quantization_backends(register):
    register(NoQuantization())
