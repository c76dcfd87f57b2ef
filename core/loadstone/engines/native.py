"""The ``loadstone`` engine: loadstone owns the weight loading.

1. a fresh skeleton on the meta device (``plan.build_skeleton()``);
2. the quantization backend swaps its module types in (``convert_skeleton``);
3. every group of the plan's tensor map is read from safetensors (``pread``, no mmap), placed on
   its planned device and cast there to its planned dtype, fused where transformers fuses
   (MoE experts, with transformers' own converters), and handed to the backend's ``load_tensor``,
   which quantizes it on that device; tensors bound for the CPU in their stored dtype go into
   their final storage without a copy;
4. transformers' own finishing steps: tied weights tied, non-persistent buffers (rotary
   frequencies) computed on their device, a new task head initialised;
5. a map over several devices gets accelerate's dispatch hooks, as ``from_pretrained`` adds them.

It reads safetensors only and does not offload to disk; it says so at plan time (``problems``),
and ``engine="auto"`` then picks the transformers engine.
"""

from __future__ import annotations

import copy
from typing import Any, Iterator

from ..contract.engines import Engine, EngineContext
from ..contract.placement import map_entry
from ..contract.plan import Plan
from ..contract.tensors import TensorGroup
from .reader import SafetensorsReader


class NativeEngine(Engine):
    name = "loadstone"
    preference = 100
    description = ("loadstone's own: meta skeleton, the backend's modules swapped in, safetensors read to their "
                   "planned device and converted there")

    def problems(self, plan: Plan) -> list[str]:
        problems = []
        if plan.inventory.format != "safetensors":
            problems.append("it reads safetensors only, and this checkpoint is pickle")
        elif plan.tensor_map is None:
            problems.append("the checkpoint's tensors could not be mapped onto the model before loading")
        if "disk" in {str(d) for d in plan.device_map.values()}:
            problems.append("it does not offload to disk")
        backend = plan.quantization_backend.component
        problems += [str(p) for p in backend.native_problems(plan.quantization)]
        return problems

    def load(self, plan: Plan, ctx: EngineContext) -> Any:
        import torch

        qctx = plan.quantization
        model = plan.build_skeleton()
        ctx.backend.convert_skeleton(model, qctx)
        modules = dict(model.named_modules())
        tensor_map = plan.tensor_map
        assert tensor_map is not None, "problems() refuses plans without a tensor map"
        infos = plan.inventory.tensors
        with torch.no_grad(), SafetensorsReader(plan.inventory) as reader:
            for group in _progress(_in_file_order(tensor_map.groups, infos), ctx.progress, len(tensor_map.groups)):
                device = self.device_for(plan, group.targets[0])
                dtype = self.dtype_for(plan, group.targets[0])
                if group.converter is None:
                    tensor = _placed(reader.read(infos[group.sources[0]]), device, dtype)
                    self._hand_over(ctx, modules, group.targets[0], tensor, qctx)
                    continue
                converter = copy.deepcopy(group.converter)
                for source, pattern in zip(group.sources, group.patterns):
                    converter.add_tensor(group.targets[0], source, pattern,
                                         _placed(reader.read(infos[source]), device, dtype))
                produced = converter.convert(group.targets[0], model=model, config=model.config)
                for name, value in produced.items():
                    value = value[0] if isinstance(value, list) else value
                    self._hand_over(ctx, modules, name, _placed(value, device, self.dtype_for(plan, name)), qctx)
            for key, (module_name, name) in tensor_map.extras.items():
                tensor = _placed(reader.read(infos[key]), self.device_for(plan, module_name), None)
                ctx.backend.load_tensor(module_name, modules[module_name], name, tensor, qctx)
        finish_loading(model, plan)
        return model

    @staticmethod
    def device_for(plan: Plan, name: str) -> Any:
        key = map_entry(name, plan.device_map)
        device = plan.device_map[key] if key is not None else "cpu"
        return f"cuda:{device}" if isinstance(device, int) else str(device)

    @staticmethod
    def dtype_for(plan: Plan, name: str) -> Any:
        """The planned dtype; converted tensors arrive in the load dtype, or as stored when the
        checkpoint is pre-quantized (packed tensors must not be cast)."""
        import torch

        tensor_map = plan.tensor_map
        if name in tensor_map.converted:
            return None if plan.quantization.pre_quantized else plan.torch_dtype
        wanted = tensor_map.dtypes.get(name)
        return getattr(torch, wanted) if wanted else None

    @staticmethod
    def _hand_over(ctx: EngineContext, modules: dict[str, Any], name: str, tensor: Any, qctx: Any) -> None:
        module_name, _, leaf = name.rpartition(".")
        ctx.backend.load_tensor(module_name, modules[module_name], leaf, tensor, qctx)


def _placed(tensor: Any, device: str, dtype: Any) -> Any:
    """On its device and in its dtype; the cast happens on the target device (one copy to it, then
    the conversion there), and a tensor already right stays where it was read."""
    if tensor.device.type != device.split(":")[0] or (device.startswith("cuda") and str(tensor.device) != device):
        tensor = tensor.to(device, non_blocking=False)
    if dtype is not None and tensor.dtype != dtype:
        tensor = tensor.to(dtype)
    return tensor


def _in_file_order(groups: list[TensorGroup], infos: dict[str, Any]) -> list[TensorGroup]:
    """Groups sorted by where their first tensor lies: reads then sweep each file once, forwards."""
    def where(group: TensorGroup) -> tuple[str, int]:
        info = infos[group.sources[0]]
        return str(info.file), info.start

    return sorted(groups, key=where)


def _progress(groups: list[TensorGroup], enabled: bool, total: int) -> Iterator[TensorGroup]:
    if not enabled:
        yield from groups
        return
    from tqdm.auto import tqdm

    yield from tqdm(groups, total=total, desc="loading weights", unit="tensor", leave=False)


def finish_loading(model: Any, plan: Plan) -> None:
    """Finish a model whose every mapped tensor an engine has loaded: transformers' own steps after
    its loading loop (tie weights, compute the non-persistent buffers such as rotary frequencies on
    their planned devices, initialise a new task head; called as ``from_pretrained`` calls them),
    eval mode, then accelerate's dispatch hooks for a map over several devices. Public: engine
    authors call it last in :meth:`Engine.load`."""
    from transformers.modeling_utils import LoadStateDictConfig, PreTrainedModel
    from transformers.utils.loading_report import LoadStateDictInfo

    from ..faults import TRANSFORMERS_GLOBAL_STATE

    # What the map does not fill: tied copies (tied again) and a new task head (initialised).
    fresh = set(plan.tensor_map.fresh)
    missing = set(plan.tensor_map.tied) | fresh
    # transformers' marker on every loaded tensor (its own loader sets it as it assigns each one):
    # the model's initialiser then leaves them alone, quantized ones included.
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.device.type != "meta" and name not in fresh:
            tensor._is_hf_initialized = True
    info = LoadStateDictInfo(missing_keys=missing, unexpected_keys=set(), mismatched_keys=set(), error_msgs=[],
                             conversion_errors={}, skipped_pp_keys=set())
    config = LoadStateDictConfig(pretrained_model_name_or_path=str(plan.sources.base.path),
                                 device_map=dict(plan.device_map), dtype=plan.torch_dtype)
    with TRANSFORMERS_GLOBAL_STATE:
        PreTrainedModel._finalize_model_loading(model, config, info)
    model.eval()
    devices = {str(d) for d in plan.device_map.values()}
    if len(devices) > 1:
        from transformers.integrations.accelerate import accelerate_dispatch

        accelerate_dispatch(model, getattr(model, "hf_quantizer", None), dict(plan.device_map), None, None, False)
