"""FSDP2 under torchrun: ``placement="fsdp"`` and the ``fsdp`` engine.

Each process ends up holding only its shard of every parameter (``torch.distributed.fsdp.fully_shard``,
dimension 0), and no process ever holds a full copy of the model: the engine builds the model on
the meta device, lets the quantization backend swap its layers in, and then streams the
checkpoint one *unit* at a time. Each unit's tensors are read, converted by the backend on this
process's device (bitsandbytes quantizes them there), and the unit is sharded at once, which
frees everything but this process's rows. Peak memory is the shards plus one unit in flight.

A unit is the parameter-owning modules of one decoder layer (its linears and norms, sharded as
one FSDP group: one all-gather per layer), or one module outside the layers (embeddings, final
norm, head; tied modules together). The decoder layer module itself is left free: adapters are
added after loading (peft wraps those linears), and a standard ``fully_shard(layer)`` then
``fully_shard(model)`` afterwards (:func:`shard_model`) makes each layer a unit of the adapters'
parameters, so training, gradient reduction and optimizers work as in any FSDP2 program.

Where the bytes come from (engine option ``source``): ``"each"`` (default) -- every process reads
the checkpoint itself with ``pread``; ``"rank0"`` -- process 0 reads each tensor and broadcasts
it. bench/fsdp_loading.py measures both: on a CPU with gloo they tie in memory and time, and "each"
needs no single reader that the other processes wait for (docs/devicemap.md has the numbers).
"""

from __future__ import annotations

import os
from typing import Any

from loadstone import (
    Engine,
    EngineContext,
    OptionError,
    PlacementContext,
    PlacementError,
    PlacementStrategy,
    Plan,
    finish_loading,
)

from .rules import device_label
from .units import size

# safetensors dtype codes -> torch dtype names, for tensors that arrive by broadcast
_DTYPES = {"BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16", "I32": "int32",
           "U32": "uint32", "I64": "int64", "U64": "uint64", "F16": "float16", "BF16": "bfloat16", "F32": "float32",
           "F64": "float64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def world_size() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


class FsdpPlacement(PlacementStrategy):
    name = "fsdp"
    description = ("fsdp[:N]: each of N torchrun processes holds 1/N of every tensor (FSDP2) on cuda:$LOCAL_RANK, "
                   "the CPU without CUDA; loaded by the fsdp engine")

    def matches(self, spec: str) -> bool:
        return spec == self.name or spec.startswith(self.name + ":")

    def place(self, ctx: PlacementContext) -> dict[str, Any]:
        _, sep, text = str(ctx.spec).partition(":")
        if sep and (not text.strip().isdigit() or int(text) < 1):
            raise PlacementError(f"cannot read the number of processes in placement {ctx.spec!r}.", field="placement",
                                 expected="fsdp (this torchrun's world size) or fsdp:N with N >= 1", found=ctx.spec,
                                 fix="write placement='fsdp', or 'fsdp:8' to plan for 8 processes")
        world = int(text) if sep else world_size()
        local_rank, cuda = ctx.local_cuda_device()
        budgeted = any(isinstance(k, int) for k in (ctx.max_memory or {}))
        device: Any = cuda
        if cuda is None:
            device = local_rank if budgeted else "cpu"  # budgets for GPUs: a plan for a machine that has them
        ctx.sharded_over = world
        ctx.note(f"FSDP over {world} process(es): this one (LOCAL_RANK={local_rank}) holds 1/{world} of every "
                 f"tensor on {device_label(device)}")
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            ctx.note("no torch.distributed process group here: a load of this plan needs torchrun and "
                     "init_process_group()")
        return {"": device}


class FsdpEngine(Engine):
    name = "fsdp"
    # The kernel gives sharded plans only to engines that shard, and this one declines every other
    # plan: after the built-ins, so that engine="auto" never has to pass it over.
    preference = 1000
    shards = True
    description = "FSDP2 shards streamed from safetensors: each torchrun process reads, converts and keeps its shard"

    SOURCES = ("each", "rank0")

    def option_help(self) -> dict[str, str]:
        return {"source": "where each process's bytes come from: each (default: every process reads its tensors "
                          "itself) or rank0 (process 0 reads every tensor and broadcasts it)"}

    def normalize_options(self, options: dict[str, Any]) -> dict[str, Any]:
        options = super().normalize_options(options)
        source = str(options.get("source", "each")).strip().lower()
        if source not in self.SOURCES:
            raise OptionError(f"engine 'fsdp' does not know the source {options['source']!r}.",
                              field="engine option source", expected=" or ".join(self.SOURCES),
                              found=repr(options["source"]), fix="pass engine_options={'source': 'each'} (CLI: "
                              "--engine-option source=each) or 'rank0'")
        return {"source": source}

    def problems(self, plan: Plan) -> list[str]:
        if not plan.sharded_over:
            return ["it loads sharded plans only (placement='fsdp')"]
        import torch.distributed as dist

        problems = []
        # A plan may be made anywhere (for a torchrun job elsewhere); a load needs the processes.
        if plan.report.kind == "load" and not (dist.is_available() and dist.is_initialized()):
            problems.append("torch.distributed is not initialized: start the script with torchrun and call "
                            "torch.distributed.init_process_group() before loading")
        elif plan.report.kind == "load" and dist.get_world_size() != plan.sharded_over:
            problems.append(f"the plan shards over {plan.sharded_over} processes but {dist.get_world_size()} are "
                            f"running")
        if plan.inventory.format != "safetensors" or plan.tensor_map is None:
            problems.append("it streams safetensors checkpoints whose tensors were mapped at plan time")
        backend = plan.quantization_backend.component
        problems += [str(p) for p in backend.native_problems(plan.quantization)]
        settings = (plan.report.quantization or {}).get("settings") or {}
        storage = settings.get("quant_storage")
        if storage is not None and storage != plan.dtype:
            problems.append(f"4-bit weights would be packed as {storage} in a {plan.dtype} model; FSDP needs them stored "
                            f"in the model's dtype, so that its all-gathers and mixed-precision casts treat them like "
                            f"every other parameter: pass quantization_options={{'quant_storage': '{plan.dtype}'}}"
                            + (f" (or load with dtype='{storage}')" if storage != "uint8" else ""))
        if settings.get("upcast") and plan.request.trainable:
            problems.append("peft's k-bit training preparation (upcast) would cast the sharded packed 4-bit weights to "
                            "float32, destroying them: pass quantization_options={'upcast': False}")
        return problems

    def load(self, plan: Plan, ctx: EngineContext) -> Any:
        import torch
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        from loadstone import SafetensorsReader  # here: plugin discovery imports this module on every load

        device = torch.device(device_label(plan.device_map[""]))
        if device.type == "cuda":
            torch.cuda.set_device(device)
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        model = plan.build_skeleton()
        ctx.backend.convert_skeleton(model, plan.quantization)
        units, loose = _units(model, plan)
        source = plan.engine_options.get("source", "each")
        stream = _Stream(plan, ctx, model, device, source)
        with SafetensorsReader(plan.inventory) as reader, torch.no_grad():
            stream.reader = reader
            for group in loose:  # buffers saved in the checkpoint: small, never sharded
                stream.load(group)
            for unit in units:
                for item in unit.groups:
                    stream.load(item)
                _shard(model, unit.modules, mesh)
        finish_loading(model, plan)
        for unit in units:  # a new task head, initialised by finish_loading: shard it now
            if not unit.groups and _materialised(model, unit.modules):
                _shard(model, unit.modules, mesh)
        from torch.distributed.fsdp import fully_shard

        fully_shard(model, mesh=mesh)  # one root over the units, so that the model runs as it is
        mine = sum(_local_bytes(p) for p in model.parameters())
        ctx.note(f"fsdp (source={source}): rank {dist.get_rank()} of {dist.get_world_size()} holds {size(mine)} of "
                 f"parameters in {len(units)} FSDP units on {device}")
        return model


class _Unit:
    """Modules sharded together and the tensor groups that fill them."""

    def __init__(self, modules: list[str]):
        self.modules = modules
        self.groups: list[Any] = []


def _units(model: Any, plan: Plan) -> tuple[list[_Unit], list[Any]]:
    """The FSDP units of the base model and the tensor groups (and pre-quantized state tensors)
    that fill each; also the groups that fill only buffers, which are never sharded.

    A unit is the parameter-owning modules of one decoder layer (one all-gather per layer, while
    the layer module itself stays free for the adapters' unit), or one module outside the layers;
    tied modules, and modules one conversion fills, are merged into one unit."""
    owning = {name: m for name, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))}
    classes = set(getattr(model, "_no_split_modules", None) or [])
    layers = [name for name, m in model.named_modules() if type(m).__name__ in classes]
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}

    def home(name: str) -> str:
        return next((layer for layer in layers if name.startswith(layer + ".")), name)

    parent = {name: home(name) for name in owning}
    parent.update({h: h for h in parent.values()})

    def find(name: str) -> str:
        while parent[name] != name:
            parent[name] = parent[parent[name]]
            name = parent[name]
        return name

    def param_owner(tensor: str) -> str | None:
        module, _, leaf = tensor.rpartition(".")
        return module if module in owning and leaf in owning[module]._parameters else None

    links = [(a, b) for a, b in ((param_owner(t), param_owner(s)) for t, s in
                                 (getattr(model, "all_tied_weights_keys", None) or {}).items()) if a and b]
    tensor_map = plan.tensor_map
    items: list[tuple[list[str], Any]] = [([o for o in map(param_owner, g.targets) if o], g) for g in tensor_map.groups]
    # a pre-quantized layer's state tensors ("weight.absmax") go with the layer they belong to
    items += [([module] if module in owning else [], (key, module, name))
              for key, (module, name) in tensor_map.extras.items()]
    links += [(owners[0], other) for owners, _ in items for other in owners[1:]]
    for a, b in links:
        parent[find(a)] = find(b)
    units: dict[str, _Unit] = {}
    for name in owning:
        units.setdefault(find(name), _Unit([])).modules.append(name)
    for unit in units.values():  # a module's own subtree is its unit's already
        unit.modules = [m for m in unit.modules if not any(m.startswith(o + ".") for o in unit.modules)]
    loose = []
    for owners, item in items:
        (units[find(owners[0])].groups if owners else loose).append(item)
    ordered = sorted(units.values(), key=lambda u: min(order[m] for m in u.modules))
    # FSDP2 shards inner units first: a unit holding an ancestor of another's module goes after it
    def contains(outer: _Unit, inner: _Unit) -> bool:
        return any(m.startswith(o + ".") for o in outer.modules for m in inner.modules)

    for _ in range(len(ordered) ** 2):
        late = next((i for i, u in enumerate(ordered) if any(contains(u, v) for v in ordered[i + 1:])), None)
        if late is None:
            break
        ordered.append(ordered.pop(late))
    return ordered, loose


class _Stream:
    """Reads a tensor group (each process itself, or process 0 and a broadcast), places it on this
    process's device and hands it to the quantization backend, as the native engine does."""

    def __init__(self, plan: Plan, ctx: EngineContext, model: Any, device: Any, source: str):
        import torch.distributed as dist

        self.plan, self.ctx, self.device, self.source = plan, ctx, device, source
        self.modules = dict(model.named_modules())
        self.infos = plan.inventory.tensors
        self.rank = dist.get_rank()
        self.reader: Any = None
        # gloo broadcasts CPU tensors, NCCL device tensors
        self.wire = "cpu" if dist.get_backend() == "gloo" else device

    def read(self, key: str) -> Any:
        if self.source == "each":
            return self.reader.read(self.infos[key])
        import torch
        import torch.distributed as dist

        info = self.infos[key]
        if self.rank == 0:
            tensor = self.reader.read(info).to(self.wire)
        else:
            tensor = torch.empty(info.shape, dtype=getattr(torch, _DTYPES[info.dtype]), device=self.wire)
        dist.broadcast(tensor, src=0)
        return tensor

    def load(self, item: Any) -> None:
        qctx = self.plan.quantization
        if isinstance(item, tuple):  # a pre-quantized layer's state tensor (tensor_map.extras)
            key, module_name, name = item
            tensor = self.place(self.read(key), None)
            self.ctx.backend.load_tensor(module_name, self.modules[module_name], name, tensor, qctx)
            return
        group, target = item, item.targets[0]
        if group.converter is None:
            self.hand_over(target, self.place(self.read(group.sources[0]), self.dtype_for(target)))
            return
        import copy

        converter = copy.deepcopy(group.converter)
        for key, pattern in zip(group.sources, group.patterns):
            converter.add_tensor(target, key, pattern, self.place(self.read(key), self.dtype_for(target)))
        model = next(iter(self.modules.values()))
        for name, value in converter.convert(target, model=model, config=model.config).items():
            value = value[0] if isinstance(value, list) else value
            self.hand_over(name, self.place(value, self.dtype_for(name)))

    def hand_over(self, name: str, tensor: Any) -> None:
        module_name, _, leaf = name.rpartition(".")
        self.ctx.backend.load_tensor(module_name, self.modules[module_name], leaf, tensor, self.plan.quantization)

    def place(self, tensor: Any, dtype: Any) -> Any:
        tensor = tensor.to(self.device)
        return tensor.to(dtype) if dtype is not None and tensor.dtype != dtype else tensor

    def dtype_for(self, name: str) -> Any:
        """Converted tensors arrive in the load dtype (as stored when pre-quantized); others in
        their planned dtype."""
        import torch

        tensor_map = self.plan.tensor_map
        if name in tensor_map.converted:
            return None if self.plan.quantization.pre_quantized else self.plan.torch_dtype
        wanted = tensor_map.dtypes.get(name)
        return getattr(torch, wanted) if wanted else None


def _materialised(model: Any, names: list[str]) -> bool:
    params = [p for n in names for p in model.get_submodule(n).parameters(recurse=False)]
    return bool(params) and not any(p.is_meta or _is_dtensor(p) for p in params)


def _is_dtensor(tensor: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def _shard(model: Any, names: list[str], mesh: Any) -> None:
    """Shard one unit: tied parameters made one object again first (loading replaced one of them),
    and each parameter's own attributes (bitsandbytes' quant_type, compress_statistics, which peft
    reads to wrap the layer) carried over to its sharded replacement."""
    from torch.distributed.fsdp import fully_shard

    modules = [model.get_submodule(n) for n in names]
    for target, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        module_name, _, leaf = target.rpartition(".")
        if module_name in names:
            model.get_submodule(module_name)._parameters[leaf] = model.get_parameter(source)
    carried = {(id(m), leaf): dict(p.__dict__) for m in modules for leaf, p in m._parameters.items() if p is not None}
    fully_shard(modules if len(modules) > 1 else modules[0], mesh=mesh, reshard_after_forward=True)
    for module in modules:
        for leaf, param in module._parameters.items():
            if param is None:
                continue
            for key, value in carried.get((id(module), leaf), {}).items():
                if not hasattr(param, key):
                    setattr(param, key, value)
            param._is_hf_initialized = True


def _local_bytes(param: Any) -> int:
    local = param.to_local() if _is_dtensor(param) else param
    return local.numel() * local.element_size()


def gather_rank_memory(report: Any) -> None:
    """Every process's peak host RSS and device memory, gathered into each process's report
    (``report.memory["ranks"]``, and a note per rank). A collective: every rank calls it."""
    import socket

    import torch.distributed as dist

    mine = {"rank": dist.get_rank(), "host": socket.gethostname(),
            "peak_host_rss_bytes": report.memory.get("peak_host_rss_bytes"),
            "peak_device_bytes": dict(report.memory.get("peak_device_bytes") or {})}
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    report.memory["ranks"] = everyone
    for entry in everyone:
        devices = ", ".join(f"{d} {size(n)}" for d, n in entry["peak_device_bytes"].items())
        report.notes.append(f"rank {entry['rank']} ({entry['host']}): peak host RSS "
                            f"{size(entry['peak_host_rss_bytes'] or 0)}" + (f", peak {devices}" if devices else ""))


def shard_model(model: Any, **fsdp_kwargs: Any) -> Any:
    """``fully_shard`` each decoder layer, then the whole model, on the mesh the ``fsdp`` engine
    loaded it with: what every FSDP2 training script does after adding adapters, so that the
    adapters' parameters (added by peft inside the layers) are sharded, reduced and optimised as
    FSDP parameters. Returns ``model``."""
    from torch.distributed.fsdp import fully_shard

    mesh = fsdp_kwargs.pop("mesh", None) or next(p.device_mesh for p in model.parameters() if _is_dtensor(p))
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    classes = set(getattr(base, "_no_split_modules", None) or [])
    for module in [m for m in model.modules() if type(m).__name__ in classes]:
        fully_shard(module, mesh=mesh, **fsdp_kwargs)
    fully_shard(model, mesh=mesh, **fsdp_kwargs)
    return model
