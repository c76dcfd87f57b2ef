"""The bitsandbytes quantization backend: NF4, FP4 and int8, quantized on load or pre-quantized.

Built on loadstone's public API only. The module imports neither torch nor bitsandbytes: the
kernel instantiates the backend while plugins are listed, and listing must stay cheap. Every
method that needs them imports them when it runs, i.e. once this backend has been chosen.
"""

from __future__ import annotations

import importlib.metadata
from typing import Any, Mapping

from loadstone import PlacementError, QuantizationBackend, QuantizationContext, QuantizationError, map_entry

from . import cpu_kernel, memory, native, options
from .options import BnbSettings

PIP_FIX = "pip install -U 'bitsandbytes>=0.46'"
CPU_QUANTIZER_POLICY = {
    "chunked": "chunked: loadstone's kernel quantizes 4-bit weights placed on the CPU, where a probe shows it equal to "
               "bitsandbytes' quantize_4bit (bitsandbytes' own op elsewhere)",
    "bitsandbytes": "bitsandbytes: its own quantize_4bit op (option cpu_quantizer)",
}


def import_bitsandbytes() -> Any:
    """``import bitsandbytes``, turning a broken install into an error that says what to do."""
    try:
        import bitsandbytes
    except Exception as exc:  # ImportError, or a RuntimeError from a native library that fails to load
        raise QuantizationError(f"bitsandbytes is installed but cannot be imported: {type(exc).__name__}: {exc}",
                                field="bitsandbytes", fix=f"reinstall it for this torch and platform: {PIP_FIX}",
                                ) from exc
    return bitsandbytes


def device_type(device: Any) -> str:
    """``0`` (accelerate's spelling of cuda:0) -> ``cuda``; ``"xpu:1"`` -> ``xpu``."""
    return "cuda" if isinstance(device, int) else str(device).split(":")[0]


def offloaded_modules(device_map: Mapping[str, Any]) -> list[str]:
    """Modules transformers treats as offloaded next to bitsandbytes layers: cpu or disk entries in a map
    that also uses an accelerator, and any disk entry. An all-CPU map is not offloading: bitsandbytes
    quantizes and runs there."""
    kinds = {device_type(d) for d in device_map.values()}
    if kinds <= {"cpu"}:
        return []
    return sorted(name or "(everything)" for name, d in device_map.items() if device_type(d) in ("cpu", "disk"))


class BitsAndBytesBackend(QuantizationBackend):
    """bitsandbytes NF4 / FP4 (4-bit, QLoRA) and LLM.int8() quantization through transformers."""

    name = "bitsandbytes"
    methods = options.METHODS
    checkpoint_formats = ("bitsandbytes",)
    requirements = ("bitsandbytes>=0.46",)
    description = "bitsandbytes NF4/FP4 4-bit (QLoRA) and LLM.int8(), on load or pre-quantized checkpoints"

    # -- discovery ---------------------------------------------------------------
    def claims_checkpoint(self, quantization_config: Mapping[str, Any]) -> bool:
        method = quantization_config.get("quant_method", "")
        return str(getattr(method, "value", method)).lower() in self.checkpoint_formats

    def checkpoint_method(self, quantization_config: Mapping[str, Any]) -> str:
        return options.checkpoint_method(quantization_config)

    # -- options -----------------------------------------------------------------
    def option_help(self) -> dict[str, str]:
        return dict(options.OPTION_HELP)

    def normalize_options(self, method: str, opts: Mapping[str, Any],
                          ctx: QuantizationContext | None = None) -> dict[str, Any]:
        normalized = options.normalize(method, super().normalize_options(method, opts, ctx))
        trainable = ctx is None or ctx.request is None or ctx.request.trainable
        if normalized.get("cpu_kernel") == "packed" and trainable:
            from loadstone import OptionError

            raise OptionError("cpu_kernel='packed' is for trainable=False loads: bitsandbytes' packed CPU kernel has "
                              "no autograd, so training through its layers would get no gradients.",
                              field="quantization option cpu_kernel", expected="generic (for a trainable load)",
                              found="packed", fix="drop the option, or load with trainable=False (CLI: --frozen)")
        return normalized

    def settings(self, ctx: QuantizationContext) -> BnbSettings:
        """What this load does: options over defaults, or the pre-quantized checkpoint's own settings."""
        return options.resolve(ctx)

    # -- planning ----------------------------------------------------------------
    def adjust_dtype(self, dtype: Any, ctx: QuantizationContext) -> Any:
        # The first hook that sees the checkpoint's config: reject options that contradict a
        # pre-quantized checkpoint here, at plan time, rather than halfway through a load.
        self.settings(ctx)
        return dtype

    def parameter_bytes(self, module_name: str, param_name: str, tensor: Any, module: Any,
                        ctx: QuantizationContext) -> float:
        import torch

        settings = self.settings(ctx)
        numel = tensor.numel()
        if param_name == "weight" and self.quantizes(module_name, module, settings, ctx):
            if settings.four_bit:
                return memory.four_bit_bytes(numel, double_quant=settings.double_quant)
            return memory.int8_bytes(numel, out_features=_out_features(module))
        element_size = tensor.element_size()
        # peft's k-bit preparation casts fp16/bf16 parameters (not buffers) to float32 after loading.
        upcast = settings.upcast and ctx.request is not None and ctx.request.trainable
        if upcast and isinstance(tensor, torch.nn.Parameter) and tensor.dtype in (torch.float16, torch.bfloat16):
            element_size = 4
        return numel * element_size

    def converts_tensor(self, module_name: str, param_name: str, module: Any, ctx: QuantizationContext) -> bool:
        return param_name == "weight" and self.quantizes(module_name, module, self.settings(ctx), ctx)

    def transient_bytes(self, module_name: str, param_name: str, tensor: Any, module: Any,
                        ctx: QuantizationContext) -> float:
        if ctx.pre_quantized:  # packed tensors are taken as they are: nothing full-precision in flight
            return 0.0
        in_flight = super().transient_bytes(module_name, param_name, tensor, module, ctx)
        if in_flight and self.quantizes_on_cpu(f"{module_name}.{param_name}", ctx):
            import torch

            settings = self.settings(ctx)
            in_flight += memory.cpu_quantize_workspace(tensor.numel(), settings.method,
                                                       element_size=tensor.element_size(),
                                                       transposed=not isinstance(module, torch.nn.Linear),
                                                       chunked=settings.cpu_quantizer == options.CHUNKED)
        return in_flight

    @staticmethod
    def quantizes_on_cpu(tensor_name: str, ctx: QuantizationContext) -> bool:
        """Whether the tensor is placed, and so quantized, on the CPU; unknown before placement
        (``ctx.device_map`` is ``None``), when the kernel asks for the placement strategy's view."""
        if ctx.device_map is None:
            return False
        key = map_entry(tensor_name, ctx.device_map)
        return key is not None and device_type(ctx.device_map[key]) == "cpu"

    def quantizes(self, module_name: str, module: Any, settings: BnbSettings, ctx: QuantizationContext) -> bool:
        """Whether transformers swaps this module for a bitsandbytes layer, decided by transformers'
        own rule: plain ``nn.Linear`` or GPT-2's ``Conv1D``, minus the kept modules. Fused 3-D expert
        tensors of MoE blocks (Mixtral, Qwen2-MoE) are neither, so they stay in the load dtype."""
        import torch
        from transformers.pytorch_utils import Conv1D
        from transformers.quantizers.quantizers_utils import should_convert_module

        if not (type(module) is torch.nn.Linear or isinstance(module, Conv1D)):
            return False
        return should_convert_module(module_name, self.kept_modules(settings, ctx))

    def kept_modules(self, settings: BnbSettings, ctx: QuantizationContext) -> list[str]:
        """Our keep list plus the architecture's ``_keep_in_fp32_modules``, which transformers adds too."""
        import transformers

        kept = list(settings.keep_modules)
        for arch in getattr(ctx.model_config, "architectures", None) or []:
            cls = getattr(transformers, arch, None)
            for attr in ("_keep_in_fp32_modules", "_keep_in_fp32_modules_strict"):
                kept += [m for m in (getattr(cls, attr, None) or []) if m not in kept]
        return kept

    def check_placement(self, device_map: dict[str, Any], ctx: QuantizationContext) -> dict[str, Any]:
        settings = self.settings(ctx)
        kinds = {device_type(d) for d in device_map.values()} - {"disk"}
        if kinds <= {"cuda"} and not ctx.loading:
            # Every bitsandbytes release runs on CUDA, and importing it costs seconds (it sets up
            # torch.compile), which would dominate a plan. A load imports it here, so that a
            # broken install is a clear error before any weight is read.
            supported, version = {"cuda"}, "(any)"
        else:
            bnb = import_bitsandbytes()
            supported = set(getattr(bnb, "supported_torch_devices", {"cuda", "cpu"}))
            version = getattr(bnb, "__version__", "?")
        for name, device in device_map.items():
            kind = device_type(device)
            if kind != "disk" and kind not in supported:
                raise PlacementError(
                    f"bitsandbytes {version} cannot run {settings.method} layers on {kind!r}: the device map puts "
                    f"{name or 'the whole model'!r} there.", field="placement",
                    expected="one of: " + ", ".join(sorted(supported)), found=f"{name or '(everything)'}: {device}",
                    fix="place the model on a supported device (e.g. placement='cuda:0' or 'cpu'), or load it "
                        "without quantization")
        offloaded = offloaded_modules(device_map)
        if not offloaded:
            return device_map
        shown = ", ".join(offloaded[:5]) + (f" and {len(offloaded) - 5} more" if len(offloaded) > 5 else "")
        devices = ", ".join(sorted({str(d) for d in device_map.values()}))
        accelerated = any(device_type(d) not in ("cpu", "disk") for d in device_map.values())
        if ctx.pre_quantized:
            # Offloaded modules would be built unquantized, and the packed weights cannot fill them.
            raise PlacementError(
                f"the device map offloads {shown} to cpu/disk, but this checkpoint is pre-quantized "
                f"({settings.method}): its packed weights can only be loaded into bitsandbytes layers on the "
                f"compute device.", field="placement", expected="everything on accelerators, or everything on "
                "the cpu", found=devices, fix="give the accelerator more memory (max_memory), use placement='cpu', "
                "or load the original unquantized checkpoint with cpu_offload=True")
        if not settings.cpu_offload:
            raise PlacementError(
                f"the device map offloads {shown} to cpu/disk; bitsandbytes quantizes only modules on the compute "
                f"device, so transformers refuses {settings.method} with this map.", field="placement",
                expected="every module on accelerators, or everything on the cpu", found=devices,
                fix="give the accelerator more memory (max_memory) or use a smaller model so that everything fits; "
                    "use placement='cpu' to quantize and run on the CPU; or pass the option cpu_offload=True to keep "
                    "the offloaded modules unquantized in the load dtype (they then take 2-4x the bytes the plan "
                    "shows for them)")
        if not accelerated:
            # transformers would keep every cpu and disk module unquantized: nothing would be quantized.
            raise PlacementError(
                f"cpu_offload=True with a device map that uses no accelerator ({devices}) would leave every module "
                f"unquantized.", field="placement", expected="an accelerator in the device map", found=devices,
                fix="use placement='cpu' (bitsandbytes quantizes on the CPU) without disk entries, or load without "
                    "quantization")
        return device_map

    # -- loading -----------------------------------------------------------------
    def native_problems(self, ctx: QuantizationContext) -> list[str]:
        if self.settings(ctx).cpu_offload and offloaded_modules(ctx.device_map or {}):
            return ["cpu_offload keeps the offloaded modules unquantized, which only the transformers engine does"]
        return []

    def transformers_config(self, ctx: QuantizationContext) -> Any:
        if ctx.pre_quantized:
            # transformers reads the checkpoint's own quantization_config; a second one would be
            # ignored (with a warning), and the packed weights fix every setting anyway.
            return None
        return self.bitsandbytes_config(ctx)

    def bitsandbytes_config(self, ctx: QuantizationContext) -> Any:
        """The ``transformers.BitsAndBytesConfig`` of this load (the checkpoint's own when pre-quantized)."""
        import torch
        from transformers import BitsAndBytesConfig

        if ctx.pre_quantized:
            return BitsAndBytesConfig.from_dict(dict(ctx.checkpoint_config or {}))
        settings = self.settings(ctx)
        # Only a map that really offloads may enable it: with it on, transformers leaves every
        # cpu-placed module unquantized, which for an all-CPU map would be the whole model.
        offload = settings.cpu_offload and bool(offloaded_modules(ctx.device_map or {}))
        common = dict(llm_int8_skip_modules=list(settings.keep_modules), llm_int8_enable_fp32_cpu_offload=offload)
        if not settings.four_bit:
            return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=settings.threshold, **common)
        compute = settings.compute_dtype or str(ctx.dtype or torch.float32).replace("torch.", "")
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=settings.method,
                                  bnb_4bit_compute_dtype=getattr(torch, compute),
                                  bnb_4bit_use_double_quant=settings.double_quant,
                                  bnb_4bit_quant_storage=getattr(torch, settings.quant_storage), **common)

    def convert_skeleton(self, model: Any, ctx: QuantizationContext) -> None:
        native.convert_skeleton(model, self.bitsandbytes_config(ctx), ctx)

    def accepts_tensor(self, module_name: str, name: str, module: Any, ctx: QuantizationContext) -> bool:
        settings = self.settings(ctx)
        return (ctx.pre_quantized and name in native.state_names(settings)
                and self.quantizes(module_name, module, settings, ctx))

    def load_tensor(self, module_name: str, module: Any, name: str, tensor: Any, ctx: QuantizationContext) -> None:
        native.load_tensor(module_name, module, name, tensor, ctx, self.settings(ctx))

    def finish_model(self, model: Any, ctx: QuantizationContext) -> list[str]:
        native.finish(model, ctx)
        settings = self.settings(ctx)
        if not settings.four_bit:
            return []
        chunked = ctx.state.get("cpu_quantizer")
        note = chunked.note() if chunked is not None else None
        return ([note] if note else []) + cpu_kernel.configure(model, packed=settings.cpu_kernel == "packed")

    def prepare_for_training(self, model: Any, ctx: QuantizationContext) -> list[str]:
        import torch

        settings = self.settings(ctx)
        notes = []
        if settings.upcast:
            from peft import prepare_model_for_kbit_training

            halves = sum(1 for p in model.parameters()
                         if p.dtype in (torch.float16, torch.bfloat16) and type(p).__name__ != "Params4bit")
            # The kernel enables gradient checkpointing afterwards, the same way for every backend.
            prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
            notes.append(f"k-bit training preparation (peft.prepare_model_for_kbit_training): {halves} fp16/bf16 "
                         f"parameters (norms, embeddings, kept modules) cast to float32")
        else:
            notes.append("upcast=False: non-quantized parameters keep the load dtype")
        return notes

    def describe(self, ctx: QuantizationContext) -> dict[str, Any]:
        settings = self.settings(ctx)
        details = super().describe(ctx)
        details["settings"] = settings.to_dict()
        if settings.four_bit and settings.compute_dtype is None and ctx.dtype is not None:
            details["settings"]["compute_dtype"] = str(ctx.dtype).replace("torch.", "")
        if settings.four_bit and any(device_type(d) == "cpu" for d in (ctx.device_map or {}).values()):
            details["cpu_kernel"] = cpu_kernel.policy(settings.cpu_kernel == "packed",
                                                      cpu_kernel.packed_kernel_available())
            if not ctx.pre_quantized:
                details["cpu_quantizer"] = CPU_QUANTIZER_POLICY[settings.cpu_quantizer]
        details["bits_per_quantized_parameter"] = round(
            memory.bits_per_parameter(settings.method, double_quant=settings.double_quant), 3)
        try:
            details["bitsandbytes_version"] = importlib.metadata.version("bitsandbytes")
        except importlib.metadata.PackageNotFoundError:  # pragma: no cover - the kernel checked requirements
            details["bitsandbytes_version"] = None
        return details


def _out_features(module: Any) -> int:
    # nn.Linear stores (out, in); GPT-2's Conv1D stores (in, out) and names it nf.
    return int(getattr(module, "out_features", None) or getattr(module, "nf"))
