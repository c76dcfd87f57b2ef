"""Which checkpoint tensors fill which model tensors: the plan's tensor map.

Computed once at plan time from the safetensors headers and the model skeleton, with
transformers' own renaming and fusion rules (``get_model_conversion_mapping``: a Mixtral
checkpoint stores ``experts.0.w1.weight`` per expert, the model holds one fused
``experts.gate_up_proj``), so no engine recomputes them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class TensorGroup:
    """Model tensors filled from checkpoint tensors in one step.

    :ivar targets: full names of model tensors (as the skeleton names them).
    :ivar sources: checkpoint keys, in the order a conversion consumes them.
    :ivar converter: a transformers ``WeightConverter`` that turns the sources into the targets
        (concatenation of experts, splits ...), or ``None``: one source fills one target as it is
        (possibly under another name). Use a copy per load (it collects tensors).
    :ivar patterns: for a converter, the source pattern each source matched (what
        ``WeightConverter.add_tensor`` takes), parallel to ``sources``.
    """

    targets: tuple[str, ...]
    sources: tuple[str, ...]
    converter: Any = field(default=None, compare=False, repr=False)
    patterns: tuple[str, ...] = ()

    @property
    def fused(self) -> bool:
        return self.converter is not None


@dataclass
class TensorMap:
    """The plan's account of every checkpoint tensor.

    :ivar groups: model tensors and the checkpoint tensors that fill them.
    :ivar extras: checkpoint key -> ``(module name, tensor name in it)`` for tensors the skeleton
        has no parameter for but the quantization backend accepts (a pre-quantized checkpoint's
        quantization state, e.g. ``("model.layers.0.mlp.up_proj", "weight.absmax")``).
    :ivar dtypes: model tensor name -> the dtype it is loaded in (``"bfloat16"``); tensors the
        backend converts are absent (their dtype is the backend's).
    :ivar converted: model tensors the quantization backend converts.
    :ivar tied: model tensor name -> the tensor it shares storage with (filled by tying, not read).
    :ivar fresh: model tensors the checkpoint lacks by design (a new task head, e.g.
        ``score.weight`` for a causal-LM checkpoint loaded for classification): initialised by
        the model's own initialiser, not read.
    """

    groups: list[TensorGroup] = field(default_factory=list)
    extras: dict[str, tuple[str, str]] = field(default_factory=dict)
    dtypes: dict[str, str] = field(default_factory=dict)
    converted: frozenset[str] = frozenset()
    tied: dict[str, str] = field(default_factory=dict)
    fresh: frozenset[str] = frozenset()

    def sources(self) -> set[str]:
        """Every checkpoint key the map reads."""
        return {s for g in self.groups for s in g.sources} | set(self.extras)

    def targets(self) -> set[str]:
        """Every model tensor the map fills."""
        return {t for g in self.groups for t in g.targets}
