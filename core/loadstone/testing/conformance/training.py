"""One real training step on a loaded model, and what it shows: which parameters are trainable,
which received gradients, which changed, and whether gradient checkpointing recomputed layers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class TrainingStep:
    """What one SGD step did.

    :ivar trainable: names of parameters with ``requires_grad``.
    :ivar with_grad: names of parameters that received a gradient.
    :ivar changed: trainable parameters whose values the step changed.
    :ivar frozen_changed: tensors outside ``trainable`` whose values changed (must stay empty).
    :ivar checkpointed_layers: decoder layers with gradient checkpointing switched on.
    :ivar forward_calls: calls of the decoder layers' children during the forward pass.
    :ivar recomputed: calls of the decoder layers' children during the backward pass (> 0 only
        when gradient checkpointing is active: the layers run again to rebuild activations).
    """

    loss: float
    trainable: set[str] = field(default_factory=set)
    with_grad: set[str] = field(default_factory=set)
    changed: set[str] = field(default_factory=set)
    frozen_changed: list[str] = field(default_factory=list)
    checkpointed_layers: int = 0
    forward_calls: int = 0
    recomputed: int = 0


def input_ids(vocab_size: int = 320) -> Any:
    import torch

    return torch.randint(0, vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))


def train_one_step(model: Any, ids: Any = None, lr: float = 0.5) -> TrainingStep:
    """Run forward, backward and one SGD step on ``model`` (causal LM loss on ``ids``)."""
    import torch

    from .measure import reachable_tensors

    ids = input_ids() if ids is None else ids
    model.train()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in trainable.items()}
    frozen_before = {n: t.detach().clone() for n, t in reachable_tensors(model).items()
                     if isinstance(t, torch.Tensor) and n not in trainable and t.device.type != "meta"}
    counter = _RecomputeCounter(model)
    try:
        loss = model(input_ids=ids, labels=ids).loss
        counter.phase = "backward"
        loss.backward()
    finally:
        counter.remove()
    step = TrainingStep(float(loss.detach()), set(trainable), {n for n, p in model.named_parameters() if p.grad is not None})
    optimizer = torch.optim.SGD(trainable.values(), lr=lr) if trainable else None
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    step.changed = {n for n, p in trainable.items() if not torch.equal(before[n], p.detach())}
    after = reachable_tensors(model)
    # Compared where the tensor still exists: libraries may drop caches they rebuild (bitsandbytes
    # int8 sets weight.CB to None after the first forward); that changes no weight.
    step.frozen_changed = sorted(n for n, t in frozen_before.items()
                                 if isinstance(after.get(n), torch.Tensor) and not _same_bits(t, after[n].detach()))
    step.checkpointed_layers = counter.layers
    step.forward_calls = counter.calls["forward"]
    step.recomputed = counter.calls["backward"]
    return step


def _same_bits(a: Any, b: Any) -> bool:
    import torch

    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    a, b = a.contiguous().reshape(-1), b.contiguous().reshape(-1)
    if a.is_floating_point() or a.is_complex():
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    return bool(torch.equal(a, b))


class _RecomputeCounter:
    """Forward hooks on the children of every layer that can be checkpointed (transformers'
    ``GradientCheckpointingLayer``: the decoder layers). transformers checkpoints a layer's
    ``forward`` (not ``__call__``), so the layer's own hooks fire once; its children run again,
    hooks included, when the backward pass recomputes the layer."""

    def __init__(self, model: Any):
        from transformers.modeling_layers import GradientCheckpointingLayer

        self.phase = "forward"
        self.calls = {"forward": 0, "backward": 0}
        self.handles = []
        layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
        self.layers = sum(m.gradient_checkpointing is True for m in layers)
        for layer in layers:
            for child in layer.children():
                self.handles.append(child.register_forward_hook(self._hook))

    def _hook(self, *args: Any) -> None:
        self.calls[self.phase] += 1

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def checkpointing_is_non_reentrant(model: Any) -> list[str]:
    """Problems with how gradient checkpointing was switched on: loadstone's kernel enables it
    once, non-reentrant; a backend that enables it again (e.g. with peft's
    ``prepare_model_for_kbit_training(use_gradient_checkpointing=True)``) replaces that with the
    reentrant kind."""
    problems = []
    for name, module in model.named_modules():
        if getattr(module, "gradient_checkpointing", False) is not True:
            continue
        func = getattr(module, "_gradient_checkpointing_func", None)
        keywords = getattr(func, "keywords", None) or {}
        if keywords.get("use_reentrant", True) is not False:
            problems.append(f"{name or type(module).__name__} checkpoints with use_reentrant="
                            f"{keywords.get('use_reentrant', 'default')!r}, not the kernel's use_reentrant=False")
    return problems
