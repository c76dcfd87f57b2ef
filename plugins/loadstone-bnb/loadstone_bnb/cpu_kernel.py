"""bitsandbytes' packed CPU kernel for 4-bit layers, and when loadstone lets it run.

On a CPU with AVX512-BF16, bitsandbytes (0.49+) repacks a ``Linear4bit`` layer's weight for a
fused inference kernel (``bitsandbytes::gemv_4bit``) the first time the layer runs a forward in
eval mode without gradients. The repack is permanent and has three consequences loadstone must
not pass on to its users:

* it asserts ``out_features % 32 == 0`` (and an even ``in_features``): Qwen2-MoE's
  ``shared_expert_gate`` (one output) crashes the first forward after a successful load;
* the packed kernel has no autograd: once repacked (``generate`` right after a load, a Trainer
  evaluation mid-training), every later training step gets zero gradients through the layer,
  with only a UserWarning from PyTorch;
* it changes the layer's bytes (the scales become bf16 and lose double quantization), so
  measurements would depend on whether a forward ran.

Policy (``finish_model``): every layer keeps the generic kernel, which trains and never changes
the weights, unless a frozen load asks for the packed one (option ``cpu_kernel="packed"``, which
a trainable load may not take); then the layers whose shape the packed kernel takes use it, the
rest keep the generic kernel. Each layer decides through bitsandbytes' own per-module switch,
``Linear4bit.support_avx512bf16_for_cpu``. The repack is lossy (the scales are rounded to bf16 and
re-quantized when the model is saved), which is why it is not the default.
"""

from __future__ import annotations

from typing import Any

BLOCK_N = 32  # bitsandbytes' _convert_weight_packed_for_cpu(block_n=32)


def packed_kernel_available() -> bool:
    """Whether bitsandbytes would repack 4-bit layers on this CPU (it has AVX512-BF16 and a
    bitsandbytes that knows the kernel). Tests replace this function to force either path."""
    try:
        from bitsandbytes.functional import has_avx512bf16
    except ImportError:  # bitsandbytes before the packed CPU kernel
        return False
    return bool(has_avx512bf16())


def packable(out_features: int, in_features: int) -> bool:
    """Whether the packed kernel takes a weight of this shape (bitsandbytes asserts otherwise)."""
    return out_features % BLOCK_N == 0 and in_features % 2 == 0


def policy(packed: bool, available: bool) -> str:
    """One line for the plan and the report."""
    if not packed:
        return ("generic" + (" (cpu_kernel='packed' would use bitsandbytes' AVX512-BF16 inference kernel on this "
                             "CPU for a frozen load)" if available else ""))
    if not available:
        return "generic: cpu_kernel='packed' asked, but this CPU has no AVX512-BF16 packed 4-bit kernel"
    return "packed AVX512-BF16 kernel where the layer's shape allows it (out_features % 32 == 0), generic elsewhere"


def configure(model: Any, *, packed: bool) -> list[str]:
    """Set each CPU ``Linear4bit`` layer's kernel switch per the policy; returns report notes."""
    import bitsandbytes as bnb

    available = packed_kernel_available()
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)
              and m.weight.device.type == "cpu"]
    if not layers:
        return []
    generic = []
    for name, module in layers:
        allowed = packed and available and packable(module.out_features, module.in_features)
        module.support_avx512bf16_for_cpu = allowed
        if packed and available and not allowed:
            generic.append(name)
    notes = [f"bitsandbytes CPU 4-bit kernel for {len(layers)} layers: {policy(packed, available)}"]
    if generic:
        shown = ", ".join(generic[:4]) + (f" and {len(generic) - 4} more" if len(generic) > 4 else "")
        notes.append(f"{len(generic)} CPU 4-bit layers keep the generic kernel: their shape does not fit the packed "
                     f"one (out_features not a multiple of {BLOCK_N}): {shown}")
    return notes


def canonical_state_bytes(state: Any) -> int | None:
    """Bytes of a repacked layer's quantization state in the layout it was loaded in, or ``None``
    when the state was not repacked. The repack is bitsandbytes' runtime choice after the first
    forward; what a model holds as loaded must not depend on it."""
    if not getattr(state, "packing_format_for_cpu", False):
        return None
    from .memory import four_bit_bytes

    numel = 1
    for d in state.shape:
        numel *= int(d)
    packed = (numel + 1) // 2
    return four_bit_bytes(numel, double_quant=bool(getattr(state, "original_nested", False)),
                          blocksize=int(state.blocksize)) - packed
