"""Stages 2-3: inspect the checkpoint and decide dtype, quantization and placement.

Nothing here reads weight data: the model is built on the meta device, sizes come from the
quantization backend's estimate, and the device map from the placement strategy. ``load`` then
hands the very same device map to the weight loader, so a plan always equals the real load.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .checkpoint import CheckpointInventory
from .components import QuantizationContext
from .errors import ComponentNotFoundError, PlacementError, QuantizationError
from .plugins import PluginManager, Registration
from .report import Decision, LoadReport
from .request import LoadRequest
from .sources import Sources
from .units import device_label, format_size, normalize_device


@dataclass
class PlacementContext:
    """Everything a placement strategy needs to produce a device map.

    :ivar spec: the user's ``placement`` value (a string, or a dict for explicit maps).
    :ivar model: the model skeleton on the meta device (quantized modules not yet swapped in).
    :ivar tensor_bytes: full parameter/buffer name -> bytes after quantization.
    :ivar max_memory: the user's budget (device -> bytes), or ``None``.
    :ivar offload_folder: where disk-offloaded weights may go, or ``None`` (no disk offload).
    :ivar quantization: the :class:`QuantizationContext` of this load.
    """

    spec: Any
    model: Any
    tensor_bytes: dict[str, float]
    max_memory: dict[str | int, int] | None
    offload_folder: str | None
    quantization: QuantizationContext
    request: LoadRequest
    notes: list[str] = field(default_factory=list)

    def note(self, text: str) -> None:
        """Explain a choice; notes become the reason of the placement decision in the report."""
        self.notes.append(text)

    @property
    def no_split_module_classes(self) -> list[str]:
        return list(getattr(self.model, "_no_split_modules", None) or [])

    def memory_budget(self) -> dict[str | int, int]:
        """The user's ``max_memory``, or what accelerate detects as free on each device."""
        from transformers.integrations.accelerate import get_max_memory

        return {k: int(v) for k, v in get_max_memory(dict(self.max_memory) if self.max_memory else None).items()}

    def infer_device_map(self, *, balanced: bool = True, max_memory: dict | None = None) -> dict[str, Any]:
        """accelerate's placement algorithm (as transformers runs it), fed with loadstone's sizes."""
        from transformers.integrations.accelerate import get_balanced_memory, infer_auto_device_map

        budget = max_memory if max_memory is not None else (dict(self.max_memory) if self.max_memory else None)
        oracle = _SizeOracle(self.tensor_bytes)
        if balanced:
            budget = get_balanced_memory(self.model, max_memory=budget, no_split_module_classes=self.no_split_module_classes,
                                         hf_quantizer=oracle)
        else:
            budget = self.memory_budget() if budget is None else budget
        return dict(infer_auto_device_map(self.model, max_memory=budget,
                                          no_split_module_classes=self.no_split_module_classes, hf_quantizer=oracle))


def _accelerator_count(kind: str) -> int:
    import torch

    if kind == "cuda":
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    if kind == "mps":
        return 1 if torch.backends.mps.is_available() else 0
    backend = getattr(torch, kind, None)
    if backend is None or not backend.is_available():
        return 0
    return backend.device_count() if hasattr(backend, "device_count") else 1


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


class _SizeOracle:
    """Quacks like the one method of transformers' HfQuantizer that its sizing code calls, so
    accelerate's algorithm sees loadstone's per-tensor estimate instead of dtype sizes."""

    def __init__(self, tensor_bytes: dict[str, float]):
        self.tensor_bytes = tensor_bytes

    def param_element_size(self, model: Any, name: str, param: Any) -> float:
        numel = param.numel()
        return self.tensor_bytes.get(name, numel * param.element_size()) / numel if numel else 0.0


@dataclass
class Plan:
    """What a load will do, computed without reading weights."""

    request: LoadRequest
    sources: Sources
    config: Any
    inventory: CheckpointInventory
    task: str
    auto_class: Any
    dtype: str
    quantization: QuantizationContext
    quantization_backend: Registration
    placement_strategy: Registration
    device_map: dict[str, Any]
    bytes_per_device: dict[str, int]
    parameter_count: int
    fits: bool
    advice: list[str]
    report: LoadReport
    module_names: frozenset[str] = field(default_factory=frozenset, repr=False)
    skeleton: Any = field(default=None, repr=False)
    #: what the quantization backend's ``transformers_config`` returned (handed to the weight loader)
    quantization_config: Any = field(default=None, repr=False)

    @property
    def torch_dtype(self) -> Any:
        import torch

        return getattr(torch, self.dtype)

    def to_dict(self) -> dict[str, Any]:
        return self.report.to_dict()

    def render(self) -> str:
        return self.report.render()


def choose_quantization(request: LoadRequest, config: Any, plugins: PluginManager,
                        folder: Any, loading: bool = True) -> tuple[Registration, QuantizationContext, Decision]:
    qconfig = getattr(config, "quantization_config", None)
    if qconfig is not None and not isinstance(qconfig, dict):
        qconfig = qconfig.to_dict()
    if qconfig:
        quant_method = str(qconfig.get("quant_method", "")).lower() or "<missing>"
        reg = plugins.backend_for_checkpoint(qconfig)
        if reg is None:
            error = plugins.missing_checkpoint_backend(quant_method)
            raise ComponentNotFoundError(
                f"{folder}/config.json says the checkpoint is pre-quantized with {quant_method!r}, and no installed "
                f"plugin loads that format (loading it as plain weights would be silently wrong).",
                file=f"{folder}/config.json", field="quantization_config.quant_method", found=quant_method,
                fix=error.fix) from None
        with plugins.guard(reg, "plan", "checkpoint_method"):
            method = reg.component.checkpoint_method(qconfig)
        if request.quantization not in (None, method):
            raise QuantizationError(
                f"the checkpoint is already quantized ({method}, {quant_method}); it cannot be re-quantized "
                f"as {request.quantization!r}.", file=f"{folder}/config.json", field="quantization",
                expected=f"no quantization argument, or {method!r}", found=request.quantization,
                fix="drop the quantization argument to load it as it is, or load the original unquantized checkpoint")
        _check_environment(reg, method, plugins)
        ctx = QuantizationContext(method, {}, qconfig, config, request=request, loading=loading)
        with plugins.guard(reg, "plan", "normalize_options"):
            ctx.options = reg.component.normalize_options(method, request.quantization_options)
        return reg, ctx, Decision.from_registration("quantization", method, reg,
                                                    f"pre-quantized checkpoint ({quant_method})")
    method = request.quantization or "none"
    reg = plugins.quantization_backend(method)
    _check_environment(reg, method, plugins)
    ctx = QuantizationContext(method, {}, None, config, request=request, loading=loading)
    with plugins.guard(reg, "plan", "normalize_options"):
        ctx.options = reg.component.normalize_options(method, request.quantization_options)
    return reg, ctx, Decision.from_registration("quantization", method, reg,
                                                "requested" if request.quantization else "default")


def _check_environment(reg: Registration, method: str, plugins: PluginManager) -> None:
    # Pre-quantized checkpoints need their backend's libraries as much as quantize-on-load does.
    with plugins.guard(reg, "plan", "environment_problems"):
        problems = reg.component.environment_problems()
    if problems:
        raise QuantizationError(
            f"quantization method {method!r} ({reg.owner()}) cannot run here: {'; '.join(problems)}.",
            field="quantization", found=method, fix="; ".join(problems))


def build_skeleton(auto_class: Any, config: Any, dtype: str, request: LoadRequest) -> Any:
    """The model on the meta device: shapes and module tree, no memory, no weights."""
    import copy

    import torch

    kwargs: dict[str, Any] = {"dtype": getattr(torch, dtype), "trust_remote_code": request.trust_remote_code}
    if request.attn_implementation:
        kwargs["attn_implementation"] = request.attn_implementation
    from .faults import TRANSFORMERS_GLOBAL_STATE

    with TRANSFORMERS_GLOBAL_STATE, torch.device("meta"):  # see faults.py: from_config patches globals
        return auto_class.from_config(copy.deepcopy(config), **kwargs)


def tensor_bytes(model: Any, reg: Registration, qctx: QuantizationContext,
                 plugins: PluginManager) -> dict[str, float]:
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    modules = dict(model.named_modules())
    sizes: dict[str, float] = {}
    backend = reg.component
    with plugins.guard(reg, "plan", "parameter_bytes"):
        for kind in ("parameters", "buffers"):
            for name, tensor in getattr(model, f"named_{kind}")():
                if name in tied:
                    continue
                module_name, _, leaf = name.rpartition(".")
                sizes[name] = float(backend.parameter_bytes(module_name, leaf, tensor, modules[module_name], qctx))
    return sizes


def bytes_by_device(sizes: dict[str, float], device_map: dict[str, Any]) -> dict[str, int]:
    out: dict[str, float] = {}
    prefixes = sorted(device_map, key=len, reverse=True)
    for name, nbytes in sizes.items():
        key = next((p for p in prefixes if p == "" or name == p or name.startswith(p + ".")), None)
        if key is None:
            raise PlacementError(f"the device map does not place {name!r}.", field="placement",
                                 found=sorted(device_map)[:8], fix="add an entry for it (or \"\" for everything)")
        label = device_label(device_map[key])
        out[label] = out.get(label, 0.0) + nbytes
    return {k: int(round(v)) for k, v in out.items()}


def check_fit(plan_bytes: dict[str, int], device_map: dict[str, Any], budget: dict[str | int, int],
              request: LoadRequest, plugins: PluginManager) -> tuple[bool, list[str]]:
    advice: list[str] = []
    fits = True
    if "disk" in plan_bytes and not request.offload_folder:
        fits = False
        advice.append(f"{format_size(plan_bytes['disk'])} would be offloaded to disk, but no offload folder was "
                      f"given: pass offload_folder=PATH (CLI: --offload-folder)")
    for dev, nbytes in plan_bytes.items():
        key = normalize_device(dev)
        if dev != "disk" and key in budget and nbytes > budget[key]:
            fits = False
            advice.append(f"{dev} needs {format_size(nbytes)} but has {format_size(budget[key])}: raise "
                          f"max_memory[{dev!r}] or use placement='auto' to spread the model")
    if not fits and request.quantization in (None, "none"):
        try:
            plugins.quantization_backend("nf4")
            advice.append("quantize on load: quantization='nf4' needs roughly 30% of the bf16 bytes")
        except ComponentNotFoundError:
            advice.append("4-bit quantization would need roughly 30% of the bf16 bytes: pip install loadstone-bnb")
    if fits and any(v in ("cpu", "disk") for v in device_map.values()) and len(set(device_map.values())) > 1:
        advice.append("parts of the model are offloaded (cpu/disk); loading and training will be slower")
    return fits, advice
