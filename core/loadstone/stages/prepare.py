"""Stage 5, prepare: freeze the base model, let the backend prepare it for training, and enable
gradient checkpointing; the same for every engine and backend."""

from __future__ import annotations

from typing import Any

from ..contract.plan import Plan
from ..plugins import PluginManager


def prepare(model: Any, plan: Plan, plugins: PluginManager) -> list[str]:
    for param in model.parameters():
        param.requires_grad = False
    notes = ["base model frozen"]
    if not plan.request.trainable:
        if any(module.training for module in model.modules()):  # engines leave it in eval mode
            model.eval()
        return notes + ["trainable=False: inference only"]
    reg = plan.quantization_backend
    with plugins.guard(reg, "prepare", "prepare_for_training"):
        notes += reg.component.prepare_for_training(model, plan.quantization)
    if plan.request.gradient_checkpointing:
        enable_checkpointing(model)
        notes.append("gradient checkpointing enabled (use_reentrant=False)")
    return notes


def enable_checkpointing(model: Any) -> None:
    """Non-reentrant activation checkpointing. Unlike the reentrant kind it propagates gradients to
    adapters without making the input embeddings require grad (peft's workaround)."""
    kwargs = {"use_reentrant": False}
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers 5's name
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:  # pragma: no cover - transformers releases before the rename
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
