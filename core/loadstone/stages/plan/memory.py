"""Bytes per tensor and per device, the peak while loading, and whether it fits the budget."""

from __future__ import annotations

from typing import Any

from ...contract.errors import ComponentNotFoundError, PlacementError
from ...contract.placement import map_entry
from ...contract.quantization import QuantizationContext
from ...contract.records import Registration
from ...contract.request import LoadRequest
from ...contract.units import device_label, format_size, normalize_device
from ...plugins import PluginManager

#: One parameter or buffer of the skeleton: (name, module name, leaf, module, tensor).
SkeletonTensor = tuple[str, str, str, Any, Any]


def tensor_sizes(tensors: list[SkeletonTensor], reg: Registration, qctx: QuantizationContext,
                 plugins: PluginManager) -> tuple[dict[str, float], frozenset[str]]:
    """Per tensor of the skeleton (``tensors``: :func:`skeleton_tensors`): resting bytes, and the
    names the backend converts (:func:`transient_sizes` gives the bytes in flight)."""
    sizes: dict[str, float] = {}
    converted: set[str] = set()
    backend = reg.component
    for name, module_name, leaf, module, tensor in tensors:
        with plugins.guard(reg, "plan", "parameter_bytes"):
            sizes[name] = float(backend.parameter_bytes(module_name, leaf, tensor, module, qctx))
        with plugins.guard(reg, "plan", "converts_tensor"):
            if backend.converts_tensor(module_name, leaf, module, qctx):
                converted.add(name)
    return sizes, frozenset(converted)


def transient_sizes(tensors: list[SkeletonTensor], reg: Registration, qctx: QuantizationContext,
                    plugins: PluginManager) -> dict[str, float]:
    """The backend's ``transient_bytes`` per tensor (non-zero ones only), for ``qctx`` as it is:
    asked before placement and again once ``qctx.device_map`` is set."""
    transient: dict[str, float] = {}
    for name, module_name, leaf, module, tensor in tensors:
        with plugins.guard(reg, "plan", "transient_bytes"):
            extra = float(reg.component.transient_bytes(module_name, leaf, tensor, module, qctx))
        if extra:
            transient[name] = extra
    return transient


def skeleton_tensors(model: Any) -> list[SkeletonTensor]:
    """``(name, module name, leaf, module, tensor)`` for every parameter and buffer, tied ones once.

    Walked once per plan and handed to each question asked per tensor: the walk over an 8B
    Llama's modules takes 2 ms, and the plan asks three times."""
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    modules = dict(model.named_modules())
    found = []
    for kind in ("parameters", "buffers"):
        for name, tensor in getattr(model, f"named_{kind}")():
            if name in tied:
                continue
            module_name, _, leaf = name.rpartition(".")
            found.append((name, module_name, leaf, modules[module_name], tensor))
    return found


def add_read_transients(transient: dict[str, float], tensor_map: Any, inventory: Any, qctx: QuantizationContext) -> None:
    """What the engines hold in flight besides the backend's own transient: a tensor stored in
    another dtype than it loads in is read as stored, then cast (both copies exist for a moment);
    a fused group (MoE experts) holds all its sources while the fused tensor is built."""
    from ...safetensors_header import TORCH_DTYPE_NAMES

    for group in tensor_map.groups:
        stored = [inventory.tensors[s] for s in group.sources]
        first = group.targets[0]
        if group.fused:
            transient[first] = max(transient.get(first, 0.0), float(sum(i.nbytes for i in stored)))
            continue
        info = stored[0]
        planned = tensor_map.dtypes.get(first) if first not in tensor_map.converted else (
            None if qctx.pre_quantized else str(qctx.dtype).replace("torch.", ""))
        if planned is not None and TORCH_DTYPE_NAMES.get(info.dtype) != planned:
            transient[first] = transient.get(first, 0.0) + info.nbytes


def bytes_by_device(sizes: dict[str, float], device_map: dict[str, Any]) -> dict[str, int]:
    out: dict[str, float] = {}
    for name, nbytes in sizes.items():
        key = map_entry(name, device_map)
        if key is None:
            raise PlacementError(f"the device map does not place {name!r}.", field="placement",
                                 found=sorted(device_map)[:8], fix="add an entry for it (or \"\" for everything)")
        label = device_label(device_map[key])
        out[label] = out.get(label, 0.0) + nbytes
    return {k: int(round(v)) for k, v in out.items()}


def peak_by_device(resting: dict[str, int], transient: dict[str, float], device_map: dict[str, Any]) -> dict[str, int]:
    """Resting bytes plus the largest tensor in flight on each device (tensors load one at a time
    per device, so the largest one sets the peak)."""
    largest: dict[str, float] = {}
    for name, nbytes in transient.items():
        key = map_entry(name, device_map)
        if key is not None:
            label = device_label(device_map[key])
            largest[label] = max(largest.get(label, 0.0), nbytes)
    return {dev: int(round(n + largest.get(dev, 0.0))) for dev, n in resting.items()}


def check_fit(plan_bytes: dict[str, int], peak_bytes: dict[str, int], device_map: dict[str, Any],
              budget: dict[str | int, int], request: LoadRequest, plugins: PluginManager) -> tuple[bool, list[str]]:
    advice: list[str] = []
    fits = True
    if "disk" in plan_bytes and not request.offload_folder:
        fits = False
        advice.append(f"{format_size(plan_bytes['disk'])} would be offloaded to disk, but no offload folder was "
                      f"given: pass offload_folder=PATH (CLI: --offload-folder)")
    for dev, nbytes in plan_bytes.items():
        key = normalize_device(dev)
        peak = peak_bytes.get(dev, nbytes)
        if dev == "disk" or key not in budget:
            continue
        if nbytes > budget[key]:
            fits = False
            advice.append(f"{dev} needs {format_size(nbytes)} but has {format_size(budget[key])}: raise "
                          f"max_memory[{dev!r}] or use placement='auto' to spread the model")
        elif peak > budget[key]:
            fits = False
            advice.append(f"{dev} holds {format_size(nbytes)} at rest but peaks at {format_size(peak)} while a "
                          f"full-precision tensor is converted, over its {format_size(budget[key])}: raise "
                          f"max_memory[{dev!r}] by {format_size(peak - budget[key])} or spread the model")
    if not fits and request.quantization in (None, "none"):
        try:
            plugins.quantization_backend("nf4")
            advice.append("quantize on load: quantization='nf4' needs roughly 30% of the bf16 bytes")
        except ComponentNotFoundError:
            advice.append("4-bit quantization would need roughly 30% of the bf16 bytes: pip install loadstone-bnb")
    if fits and any(v in ("cpu", "disk") for v in device_map.values()) and len(set(device_map.values())) > 1:
        advice.append("parts of the model are offloaded (cpu/disk); loading and training will be slower")
    return fits, advice


#: Device kinds that name an accelerator (see ``is_device_spec``). Any other text a strategy puts in a
#: map counts as absent: looked up on torch it can name something that is no device module at all
#: (``torch.device`` is a class, ``torch.cpu`` has a device_count of its own).
ACCELERATOR_KINDS = frozenset({"cuda", "mps", "xpu", "npu", "hpu", "mlu"})


def _accelerator_count(kind: str) -> int:
    import torch

    if kind not in ACCELERATOR_KINDS:
        return 0
    if kind == "cuda":
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    if kind == "mps":
        return 1 if torch.backends.mps.is_available() else 0
    # npu, hpu, mlu are attached to torch by their vendors' packages, when those are installed.
    backend = getattr(torch, kind, None)
    is_available = getattr(backend, "is_available", None)
    device_count = getattr(backend, "device_count", None)
    if not callable(is_available) or not callable(device_count) or not is_available():
        return 0
    return int(device_count())


def missing_devices(devices: Any) -> list[str]:
    """Labels of the accelerators among ``devices`` (map values or budget keys) this machine lacks."""
    absent = []
    for device in devices:
        device = normalize_device(device)
        if device in ("cpu", "disk", "meta"):
            continue
        kind, index = ("cuda", device) if isinstance(device, int) else (
            device.partition(":")[0], int(device.partition(":")[2] or 0))
        if index >= _accelerator_count(kind):
            absent.append(device_label(device))
    return sorted(set(absent))


def present_devices() -> str:
    n = _accelerator_count("cuda")
    return "cpu, disk" + (f", cuda:0 .. cuda:{n - 1}" if n else "") + (", mps" if _accelerator_count("mps") else "")
