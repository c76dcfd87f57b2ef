"""The GPTQ quantization backend: pre-quantized GPTQ checkpoints (gptqmodel, optimum and auto-gptq
formats) loaded with gptqmodel's kernels.

Built on loadstone's public API only. The module imports neither torch nor gptqmodel: the kernel
instantiates the backend while plugins are listed, and a plan of a GPTQ checkpoint must stay cheap
(importing gptqmodel takes seconds). A load imports gptqmodel at plan time, when the kernel is
chosen, so that a broken install or an impossible kernel is an error before any weight is read.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import Any, Mapping

from loadstone import PlacementError, QuantizationBackend, QuantizationContext

from . import kernels, layers, native, settings
from .kernels import KernelChoice
from .settings import GPTQSettings


class GPTQBackend(QuantizationBackend):
    """GPTQ checkpoints through transformers' GPTQ integration (optimum + gptqmodel)."""

    name = "gptq"
    methods = ("gptq",)
    checkpoint_formats = ("gptq",)
    requirements = ("gptqmodel>=7.6", "optimum>=2.3")
    description = ("GPTQ checkpoints (gptqmodel, optimum, auto-gptq's quantize_config.json), 2/3/4/8-bit, "
                   "act-order, v1/v2 zero points, on gptqmodel's CPU and GPU kernels")

    # -- discovery ---------------------------------------------------------------
    def claims_checkpoint(self, quantization_config: Mapping[str, Any]) -> bool:
        method = quantization_config.get("quant_method", "")
        return str(getattr(method, "value", method)).lower() in self.checkpoint_formats

    def checkpoint_method(self, quantization_config: Mapping[str, Any]) -> str:
        return "gptq"

    def read_checkpoint_config(self, folder: Any, config: Mapping[str, Any]) -> dict[str, Any] | None:
        return settings.read_legacy(Path(folder))

    # -- options -----------------------------------------------------------------
    def option_help(self) -> dict[str, str]:
        return dict(settings.OPTION_HELP)

    def normalize_options(self, method: str, options: Mapping[str, Any],
                          ctx: QuantizationContext | None = None) -> dict[str, Any]:
        return settings.normalize(method, super().normalize_options(method, options, ctx), ctx)

    def settings(self, ctx: QuantizationContext) -> GPTQSettings:
        """The checkpoint's settings and the user's options, validated (once per load: the estimate
        asks for every tensor)."""
        found = ctx.state.get("settings")
        if found is None:
            found = ctx.state["settings"] = settings.settings_from(ctx)
        return found

    def kernel(self, ctx: QuantizationContext) -> KernelChoice:
        """The gptqmodel kernel this load asks for, and why."""
        trainable = bool(ctx.request is None or ctx.request.trainable)
        return kernels.choose(self.settings(ctx), ctx.device_map or {"": "cpu"}, trainable)

    # -- planning ----------------------------------------------------------------
    def adjust_dtype(self, dtype: Any, ctx: QuantizationContext) -> Any:
        # The first hook that sees the checkpoint's config: refuse what cannot load here, at plan time.
        self.settings(ctx)
        return dtype

    def quantizes(self, module_name: str, module: Any, ctx: QuantizationContext) -> bool:
        return layers.quantized(module_name, module, ctx.checkpoint_config or {})

    def converts_tensor(self, module_name: str, param_name: str, module: Any, ctx: QuantizationContext) -> bool:
        if param_name not in ("weight", "bias") or not self.quantizes(module_name, module, ctx):
            return False
        # Remember the layer's size: the plugin's loadstone_after_plan checks its stored tensors.
        ctx.state.setdefault("layers", {})[module_name] = layers.features(module)
        return True

    def accepts_tensor(self, module_name: str, name: str, module: Any, ctx: QuantizationContext) -> bool:
        return name in layers.PIECES and self.quantizes(module_name, module, ctx)

    def parameter_bytes(self, module_name: str, param_name: str, tensor: Any, module: Any,
                        ctx: QuantizationContext) -> float:
        if param_name in ("weight", "bias") and self.quantizes(module_name, module, ctx):
            in_features, out_features = layers.features(module)
            if param_name == "bias":
                return out_features * layers.SCALE_BYTES  # the layer keeps its bias in float16
            gptq = self.settings(ctx)
            return layers.layer_bytes(in_features, out_features, gptq.bits, gptq.group_size)
        return tensor.numel() * tensor.element_size()

    def transient_bytes(self, module_name: str, param_name: str, tensor: Any, module: Any,
                        ctx: QuantizationContext) -> float:
        return 0.0  # packed tensors are copied as stored: nothing full-precision in flight

    def check_placement(self, device_map: dict[str, Any], ctx: QuantizationContext) -> dict[str, Any]:
        disk = sorted(name or "(everything)" for name, d in device_map.items() if str(d) == "disk")
        if disk:
            raise PlacementError(
                f"the device map offloads {', '.join(disk[:5])} to disk; gptqmodel's kernels read their packed "
                f"tensors from the device they run on.", field="placement", expected="cpu and accelerators only",
                found=", ".join(sorted({str(d) for d in device_map.values()})),
                fix="give the devices more memory (max_memory), or place the model on the cpu (placement='cpu')")
        kinds = kernels.device_kinds(device_map)
        if "cpu" in kinds and len(kinds) > 1:
            # accelerate would serve the cpu part through offload hooks (weights on meta until a
            # forward), which gptqmodel's post-load steps (zero-point conversion, kernel buffers)
            # cannot work on: not verified, so not offered.
            on_cpu = sorted(name or "(everything)" for name, d in device_map.items() if str(d) == "cpu")
            raise PlacementError(
                f"the device map puts {', '.join(on_cpu[:5])} on the cpu next to accelerators; a GPTQ model loads "
                f"onto accelerators only, or onto the cpu only.", field="placement",
                expected="every module on accelerators, or everything on the cpu",
                found=", ".join(sorted({str(d) for d in device_map.values()})),
                fix="give the accelerators more memory (max_memory) or spread the model over more GPUs "
                    "(placement='auto'), or load on the cpu (placement='cpu')")
        if ctx.loading:
            # A load imports gptqmodel anyway: an impossible kernel is refused before any weight is read.
            ctx.device_map = dict(device_map)
            trainable = bool(ctx.request is None or ctx.request.trainable)
            chosen = kernels.resolve(self.kernel(ctx), self.settings(ctx), device_map, trainable)
            ctx.state["kernel_class"] = chosen.__name__
        return device_map

    def describe(self, ctx: QuantizationContext) -> dict[str, Any]:
        details = super().describe(ctx)
        details["settings"] = self.settings(ctx).to_dict()
        choice = self.kernel(ctx)
        details["kernel"] = {**choice.to_dict(), "class": ctx.state.get("kernel_class")}
        try:
            details["gptqmodel_version"] = importlib.metadata.version("gptqmodel")
        except importlib.metadata.PackageNotFoundError:  # pragma: no cover - requirements were checked
            details["gptqmodel_version"] = None
        return details

    # -- loading -----------------------------------------------------------------
    def transformers_config(self, ctx: QuantizationContext) -> Any:
        # The checkpoint's own config with our kernel: from_pretrained takes its `backend` over the
        # checkpoint's (a loading attribute), so both engines run the same kernel.
        return native.gptq_config(ctx, self.kernel(ctx))

    def convert_skeleton(self, model: Any, ctx: QuantizationContext) -> None:
        kernels.import_gptqmodel()
        native.convert_skeleton(model, ctx, self.kernel(ctx))

    def load_tensor(self, module_name: str, module: Any, name: str, tensor: Any, ctx: QuantizationContext) -> None:
        native.load_tensor(module_name, module, name, tensor, ctx, self.settings(ctx))

    def finish_model(self, model: Any, ctx: QuantizationContext) -> list[str]:
        native.finish(model, ctx)
        return native.kernel_notes(model, self.kernel(ctx), ctx)

    # -- training ------------------------------------------------------------------
    def prepare_for_training(self, model: Any, ctx: QuantizationContext) -> list[str]:
        # peft's prepare_model_for_kbit_training leaves GPTQ models' dtypes alone (it upcasts only
        # bitsandbytes models); the kernel has frozen the base and owns gradient checkpointing.
        return ["GPTQ layers keep their packed int32 tensors and float16 scales; other parameters keep the load "
                "dtype (peft's k-bit preparation does not upcast GPTQ models)"]
