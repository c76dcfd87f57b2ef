"""Which gptqmodel kernel (``QuantLinear`` class) runs a load, and why.

gptqmodel ships a dozen kernels for the same GPTQ tensors; they differ in devices, speed, exactness
and whether they have a backward pass. Measured on the CPU with gptqmodel 7.6.0 (see docs/gptq.md):
``gptq_torch`` (``TorchLinear``) reproduces the dequantized weights exactly and trains LoRA through
peft's ``GPTQLoraLinear``; gptqmodel's own CPU choice ``gptq_torch_aten`` is lossy (about 0.5% of
the largest weight); ``gptq_torch_fused`` is as lossy for symmetric checkpoints and wrong (~50%)
for asymmetric ones; ``gptq_torch_int8`` has no backward. The GPU inference kernels (exllama,
marlin, machete) have no backward either. So loadstone asks for:

* ``gptq_torch`` for every trainable load and for CPU inference (exactness first);
* gptqmodel's ``auto`` choice for inference on accelerators (its fastest kernel there);
* whatever the user named with the ``backend`` option, refused for training when the kernel has no
  backward pass, and refused where it is known to compute wrong weights.

Importing this module is cheap; gptqmodel is imported only by :func:`import_gptqmodel`.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from typing import Any, Mapping

from loadstone import OptionError, QuantizationError

from .settings import GPTQSettings

PIP_FIX = "pip install 'gptqmodel==7.6.0' 'optimum==2.3.0'"
EXACT = "gptq_torch"


@dataclass(frozen=True)
class KernelChoice:
    """The gptqmodel backend a load asks for (what ``GPTQConfig(backend=...)`` gets) and why."""

    backend: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"backend": self.backend, "reason": self.reason}


def import_gptqmodel() -> Any:
    """``import gptqmodel``, on machines with few cores too, and a broken install as a clear error."""
    # gptqmodel sizes its CPU pool at half the cores but asks for two model-loader workers inside
    # it, so on one or two cores its pools refuse to start ("Virtual pool 'model_loader:cpu'
    # requests 2 workers but parent 'cpu' only has 1"). Two is what it needs; a value set by the
    # user wins.
    if ((os.cpu_count() or 1) + 1) // 2 < 2:
        os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    try:
        # Its import prints a banner and environment notes to stdout, which belongs to the program
        # (`loadstone load --json` writes its report there): they go to stderr.
        with contextlib.redirect_stdout(sys.stderr):
            import gptqmodel
    except Exception as exc:  # ImportError, or a native extension that fails to load
        raise QuantizationError(f"gptqmodel is installed but cannot be imported: {type(exc).__name__}: {exc}",
                                field="gptqmodel", fix=f"reinstall it for this torch and platform: {PIP_FIX}",
                                ) from exc
    return gptqmodel


def device_kinds(device_map: Mapping[str, Any]) -> set[str]:
    """``{"cpu"}``, ``{"cuda"}``...; accelerate writes ``0`` for cuda:0."""
    return {"cuda" if isinstance(d, int) else str(d).split(":")[0] for d in device_map.values()}


def choose(settings: GPTQSettings, device_map: Mapping[str, Any], trainable: bool) -> KernelChoice:
    """The kernel this load asks gptqmodel for (no import: plans stay cheap)."""
    if settings.backend != "auto":
        return KernelChoice(settings.backend, "requested with the quantization option backend")
    if trainable:
        return KernelChoice(EXACT, "trainable load: TorchLinear has a backward pass (peft's GPTQ LoRA layers train "
                                   "through it) and dequantizes exactly")
    if device_kinds(device_map) <= {"cpu"}:
        return KernelChoice(EXACT, "inference on the CPU: TorchLinear reproduces the dequantized weights exactly; "
                                   "gptqmodel's own CPU choice (gptq_torch_aten) is lossy, about 0.5%")
    return KernelChoice("auto", "inference on an accelerator: gptqmodel's fastest kernel for the device")


def selector_device_map(device_map: Mapping[str, Any]) -> dict[str, Any]:
    """The map in the spelling gptqmodel's selector reads (``"cuda:0"``, not accelerate's ``0``)."""
    return {name: f"cuda:{d}" if isinstance(d, int) else str(d) for name, d in device_map.items()}


def resolve(choice: KernelChoice, settings: GPTQSettings, device_map: Mapping[str, Any], trainable: bool) -> Any:
    """The ``QuantLinear`` class gptqmodel selects for ``choice`` on these devices (imports gptqmodel).

    Raises :class:`~loadstone.OptionError` for a kernel that cannot run here or, for a trainable
    load, has no backward pass."""
    import_gptqmodel()
    from gptqmodel.utils.importer import hf_select_quant_linear_v2

    devices = ", ".join(sorted({str(d) for d in selector_device_map(device_map).values()}))
    try:
        cls = hf_select_quant_linear_v2(bits=settings.bits, group_size=settings.group_size, desc_act=settings.desc_act,
                                        sym=settings.sym, format=settings.checkpoint_format, quant_method="gptq",
                                        device_map=selector_device_map(device_map), backend=choice.backend,
                                        pack=False)
    except (ValueError, NotImplementedError, TypeError, ImportError, RuntimeError) as exc:
        raise OptionError(
            f"gptqmodel has no kernel {choice.backend!r} for this checkpoint on {devices}: {exc}",
            field="quantization option backend", found=choice.backend,
            expected=f"a kernel that runs {settings.bits}-bit, group size {settings.group_size}, "
                     f"desc_act={settings.desc_act}, sym={settings.sym} on {devices}",
            fix="use backend='auto' (loadstone picks gptq_torch, which runs everywhere), or a kernel for this "
                "device (gptq_marlin and gptq_exllama_v2 need CUDA)") from None
    if cls.__name__ == "TorchFusedLinear" and not settings.sym and "cpu" in device_kinds(device_map):
        # Measured with gptqmodel 7.6.0 (bench/cpu_gptq_kernels.py): on the CPU this kernel ignores
        # per-group zero points, so asymmetric checkpoints come out with ~50% weight error.
        raise OptionError(
            "gptqmodel's kernel TorchFusedLinear (gptq_torch_fused) computes wrong weights on the CPU for "
            "asymmetric checkpoints (sym=False): about 50% of the largest weight off, measured with gptqmodel "
            "7.6.0.", field="quantization option backend", found=choice.backend,
            expected="an exact kernel for sym=False on the CPU: gptq_torch (default)",
            fix="drop the backend option (loadstone picks gptq_torch), or use gptq_torch_aten (lossy, ~0.5%)")
    if trainable and not getattr(cls, "SUPPORTS_TRAINING", False):
        raise OptionError(
            f"gptqmodel's kernel {cls.__name__} ({choice.backend}) has no backward pass, and this load is for "
            f"training (trainable=True).", field="quantization option backend", found=choice.backend,
            expected="a kernel with a backward pass: gptq_torch (default), gptq_triton (CUDA), auto_trainable",
            fix="drop the backend option (loadstone picks gptq_torch for training), or load with trainable=False "
                "for inference")
    return cls
