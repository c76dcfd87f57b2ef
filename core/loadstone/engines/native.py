"""The ``loadstone`` engine: loadstone owns the weight loading.

1. a fresh skeleton on the meta device (``plan.build_skeleton()``);
2. the quantization backend swaps its module types in (``convert_skeleton``);
3. every group of the plan's tensor map is read from safetensors (``pread``; memory-mapped only
   with ``reader=mmap``, for tensors kept on the CPU as stored), placed on
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

import contextlib
import copy
import time
from typing import TYPE_CHECKING, Any, Iterator

from ..contract.engines import Engine, EngineContext
from ..contract.errors import OptionError
from ..contract.placement import placed_device
from ..contract.plan import Plan
from ..contract.tensors import TensorGroup
from ..contract.units import device_label, format_size, normalize_device
from .device_memory import reserve_kept
from .finish import finish_loading, start_finishing
from .instant import (
    InstantReadAhead,
    InstantTensorStream,
    checkpoint_files,
    instant_io,
    instant_ring,
    instanttensor_installed,
    refuse_overflow,
    start_read_ahead,
)
from .native_options import OPTION_HELP, auto_cpu_reader, normalize_native_options
from .page_cache import is_cold

if TYPE_CHECKING:
    from .streaming import StreamItem


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

    def option_help(self) -> dict[str, str]:
        return dict(OPTION_HELP)

    def normalize_options(self, options: dict[str, Any]) -> dict[str, Any]:
        return normalize_native_options(super().normalize_options(options))

    def extra_bytes(self, plan: Plan) -> dict[str, int]:
        """Settles the reader: instanttensor reads faster into one CUDA device (37.6 against 30.2
        GB/s for an 8B checkpoint on an H200, bench/results), through a ring buffer of its own
        outside torch's allocator, which the plan then counts."""
        options = plan.engine_options
        wanted = options.get("reader", "auto")
        devices = {str(d) for d in plan.device_map.values()}
        device = next(iter(devices)) if len(devices) == 1 else None
        label = device_label(normalize_device(device)) if device is not None else None
        usable = label is not None and label.startswith("cuda") and instanttensor_installed()
        if wanted == "instanttensor" and not usable:
            raise OptionError("engine option reader=instanttensor needs the instanttensor package and a load onto "
                              "one CUDA device.", field="engine option reader", found="instanttensor",
                              expected="pread here", fix="drop the option (reader=auto picks what can run)")
        if wanted == "mmap" and "cpu" not in devices:
            raise OptionError("engine option reader=mmap maps tensors kept on the CPU, and this plan places none "
                              f"there (it loads onto {', '.join(sorted(devices))}).", field="engine option reader",
                              found="mmap", expected="a placement that keeps tensors on the CPU",
                              fix="drop the option, or load with placement='cpu'")
        budget = (plan.report.placement.get("budget") or {}).get(label) if usable else None
        room = None if budget is None else budget - plan.peak_bytes_per_device.get(label, 0)
        ahead = plan.read_ahead
        if isinstance(ahead, InstantReadAhead):
            if wanted in ("auto", "instanttensor") and usable and ahead.device == label and (
                    room is None or room >= ahead.ring):
                options["reader"], options["io"] = "instanttensor", "buffered"
                return {label: ahead.ring + self._held_by_instanttensor(plan, label)}
            plan.read_ahead = None  # the plan went elsewhere, or has no room for the ring beside the model
            ahead.close()
        ring = instant_ring(plan.inventory)
        if wanted == "auto" and "cpu" in devices:
            wanted = auto_cpu_reader(plan)
        if wanted == "auto":
            wanted = "instanttensor" if usable and (room is None or room >= ring) else "pread"
        options["reader"] = wanted
        if wanted == "mmap":
            options.setdefault("unleased", "map" if plan.request.engine_options.get("reader") == "mmap" else "read")
        else:
            options.pop("unleased", None)  # nothing is mapped: there is no choice to report
        if wanted != "instanttensor" and options.pop("io", "auto") == "direct":
            raise OptionError("engine option io=direct reads with instanttensor, which this load cannot use: it needs "
                              "the instanttensor package, one CUDA device and room for its ring buffer (1 GiB, or "
                              "the largest tensor).",
                              field="engine option io", found="direct", expected="io=auto or io=buffered here",
                              fix="drop io=direct")
        if wanted == "instanttensor":
            options["io"] = instant_io(options.get("io", "auto"), checkpoint_files(plan.inventory))
            if "readers" in options or "chunk_bytes" in options:
                refuse_overflow(options, ring)
            return {label: ring + self._held_by_instanttensor(plan, label)}
        # pread onto a GPU: transient tensors beyond the largest group, counted here so that the
        # plan's peak holds. Not on the CPU, whose consumer quantizes with the readers' own cores.
        budgets, peaks = plan.report.placement.get("budget") or {}, plan.peak_bytes_per_device
        room = {device: (budgets[device] - peaks.get(device, 0) if device in budgets else None)
                for device, largest in self._items(plan)[2].items() if largest and device.startswith("cuda")}
        if not room:
            return {}
        from .streaming import in_flight_allowance

        allowance = in_flight_allowance(room, options.get("in_flight", "auto"))
        options["in_flight"] = min(allowance.values())
        return {device: n for device, n in allowance.items() if n}

    def _held_by_instanttensor(self, plan: Plan, device: str) -> int:
        """instanttensor's iterator keeps the tensor it handed out last while it clones the next:
        a transient tensor the engine is done with stays alive beside the next one."""
        return self._items(plan)[2].get(device, 0)

    def read_ahead(self, request: Any, inventory: Any, device: str) -> InstantReadAhead | None:
        """instanttensor starts reading every tensor onto ``device`` (a CUDA device) into a ring
        sized by :func:`~loadstone.engines.instant.read_ahead_ring`, unless the options ask for
        another reader or ``read_ahead=off``, or instanttensor cannot start (it is not installed,
        the ring does not fit): then ``None``, and the plan picks the reader as without it. With
        ``read_ahead=auto`` a quantizing load and a checkpoint out of the page cache are not read
        ahead either."""
        from ..contract.errors import LoadstoneError

        # CUDA only: asking the kernel to read a CPU load's files into the page cache ahead
        # (posix_fadvise WILLNEED) made cold loads on the 2-core machine slower, not faster (its
        # readahead competed with the pread readers: 2.1-3.5 s against 1.3-2.3 s without).
        if not device.startswith("cuda") or inventory.format != "safetensors" or not inventory.tensors:
            return None
        try:
            options = self.normalize_options(dict(request.engine_options))
        except LoadstoneError:
            return None  # the plan refuses them, in its own words
        if options.get("reader", "auto") not in ("auto", "instanttensor") or options.get("io") == "direct":
            return None
        if options.get("read_ahead", "auto") == "auto":
            if request.quantization not in (None, "none"):
                # Quantized on the device, the model takes a third of the checkpoint's bytes there:
                # a ring of the checkpoint's size held 13.6 GiB of the H200 for a 5.4 GiB NF4 model,
                # and the load was no faster (0.81 s against 0.73 s without it).
                return None
            if is_cold(checkpoint_files(inventory)):
                # From a cold disk the readers queue the import of the model's code behind the
                # weights: 3.19 s of imports, 10.77 s in all on the H200, against 0.24 and 9.72 s.
                return None
        budget = (request.max_memory or {}).get(normalize_device(device))  # max_memory's keys are normalised
        return start_read_ahead(inventory, device, options, wider=2 if request.dtype == "float32" else 1,
                                budget=budget)

    def load(self, plan: Plan, ctx: EngineContext) -> Any:
        # Imported here, not with the engine: plugin discovery comes before a read-ahead starts,
        # and these are needed only once the plan is made (the readers are busy by then).
        import torch

        from .mapped import hand_over_mapped
        from .reader import SafetensorsReader
        from .streaming import DEFAULT_CHUNK_BYTES, TensorStream

        qctx = plan.quantization
        started = time.perf_counter()
        assert plan.tensor_map is not None, "problems() refuses plans without a tensor map"
        items, owners, limits = self._items(plan)
        options = plan.engine_options
        ahead = plan.read_ahead if isinstance(plan.read_ahead, InstantReadAhead) else None
        if options.get("reader") != "instanttensor" or ahead is not None:
            # not before instanttensor allocates a ring of its own, outside torch: it needs that memory free
            reserve_kept(items)
        model = plan.build_skeleton()
        ctx.backend.convert_skeleton(model, qctx)
        start_finishing(model, plan)  # here, while a read-ahead still reads, not after the last tensor
        skeleton_s = time.perf_counter() - started
        modules = dict(model.named_modules())
        total = sum(item.info.nbytes for item in items)
        allowance = options.get("in_flight", 0)  # settled by extra_bytes
        allowance = allowance if isinstance(allowance, int) else 0
        with torch.no_grad(), SafetensorsReader(plan.inventory) as reader, \
                _progress(total, ctx.progress) as progress:
            if options.get("reader") == "mmap":
                items = hand_over_mapped(plan, ctx, reader, items, owners, model,
                                         lambda owner, tensors: self._group(plan, ctx, modules, model, owner, tensors),
                                         progress)
            if options.get("reader") == "instanttensor":
                stream = InstantTensorStream(reader, items, buffer_bytes=instant_ring(plan.inventory),
                                             io_depth=options.get("readers"),
                                             chunk_bytes=options.get("chunk_bytes"), ahead=ahead,
                                             direct=options.get("io") == "direct")
            else:
                stream = TensorStream(reader, items, readers=options.get("readers"),
                                      chunk_bytes=options.get("chunk_bytes", DEFAULT_CHUNK_BYTES),
                                      transient_limit={d: n + allowance for d, n in limits.items()})
            if isinstance(stream, InstantTensorStream) and ahead is not None:
                ctx.note(f"engine loadstone: instanttensor reader, reading since {started - ahead.started:.2f} s "
                         f"before this stage, while the plan was made (read_ahead: a {format_size(ahead.ring)} GPU "
                         f"ring buffer outside torch's allocator)")
            elif isinstance(stream, InstantTensorStream):
                chosen = "io=auto found the checkpoint out of the page cache" if plan.request.engine_options.get(
                    "io", "auto") == "auto" else "io=direct"
                ctx.note(f"engine loadstone: instanttensor reader (a {format_size(stream.buffer_bytes)} GPU ring buffer "
                         "outside torch's allocator), "
                         + (f"direct reads past the page cache ({chosen})" if stream.direct else
                            "reads through the page cache"))
            elif items:
                ctx.note(f"engine loadstone: {stream.readers} pread reader threads, {stream.chunk >> 20} MiB chunks"
                         + (", pinned buffers and CUDA streams" if stream.accelerated else ""))
            pending: list[tuple[Any, Any]] = []
            # No name may hold a tensor once it is handed over: its budget is given back next, and a
            # lingering reference would keep it alive while readers fill that budget again.
            for item, tensor in stream:
                progress(item.info.nbytes)
                owner = owners[id(item)]
                if isinstance(owner, TensorGroup):
                    pending.append((item, tensor))
                    tensor = None
                    if len(pending) < len(owner.sources):
                        continue
                    done = [i for i, _ in pending]
                    self._group(plan, ctx, modules, model, owner, [t for _, t in pending])
                    pending = []
                    for finished in done:
                        stream.release(finished)
                else:  # an extra tensor the backend accepted: as stored
                    module_name, name = owner
                    ctx.backend.load_tensor(module_name, modules[module_name], name, tensor, qctx)
                    tensor = None
                    stream.release(item)
            if getattr(stream, "fallback", None):
                ctx.note(f"engine loadstone: io=direct was refused ({stream.fallback}); read through the page cache")
            for device in stream.gpus:  # the copies are done, on every GPU, before the clock says so
                torch.cuda.synchronize(device)
        streamed_s = time.perf_counter() - started - skeleton_s
        finish_loading(model, plan)
        finish_s = time.perf_counter() - started - skeleton_s - streamed_s
        ctx.timings.update(skeleton=round(skeleton_s, 4), stream=round(streamed_s, 4), finish=round(finish_s, 4),
                           stream_gb_per_s=round(total / max(streamed_s, 1e-9) / 1e9, 2))
        return model

    def _items(self, plan: Plan) -> tuple[list[StreamItem], dict[int, Any], dict[str, int]]:
        """What to stream, in file order (each file read once, forwards); which group (or extra) each
        item belongs to; and per device the transient bytes one group needs at once (its sources)."""
        from .streaming import StreamItem

        infos, tensor_map = plan.inventory.tensors, plan.tensor_map
        units: list[Any] = [*tensor_map.groups, *tensor_map.extras.items()]

        def where(unit: Any) -> tuple[str, int]:
            info = infos[unit.sources[0]] if isinstance(unit, TensorGroup) else infos[unit[0]]
            return str(info.file), info.start

        items: list[StreamItem] = []
        owners: dict[int, Any] = {}
        limits: dict[str, int] = {}
        for unit in sorted(units, key=where):
            if not isinstance(unit, TensorGroup):
                key, (module_name, name) = unit
                item = StreamItem(infos[key], self.device_for(plan, module_name), transient=True)
                items.append(item)
                owners[id(item)] = (module_name, name)
                continue
            device = self.device_for(plan, unit.targets[0])
            dtype = self.dtype_for(plan, unit.targets[0])
            kept = not unit.fused and unit.targets[0] not in tensor_map.converted
            transient = 0
            for source in unit.sources:
                info = infos[source]
                as_stored = dtype is None or _dtype_name(dtype) == _stored_name(info)
                # a cast on the CPU happens chunk by chunk as the readers read, into the final tensor
                cast = kept and not as_stored and device == "cpu" and _castable(info, dtype)
                item = StreamItem(info, device, transient=not (kept and (as_stored or cast)),
                                  cast_to=_dtype_name(dtype) if cast else None)
                items.append(item)
                owners[id(item)] = unit
                transient += info.nbytes if item.transient else 0
            limits[device] = max(limits.get(device, 0), transient)
        return items, owners, limits

    def _group(self, plan: Plan, ctx: EngineContext, modules: dict[str, Any], model: Any, group: TensorGroup,
               tensors: list[Any]) -> None:
        qctx = plan.quantization
        dtype = self.dtype_for(plan, group.targets[0])
        if group.converter is None:
            self._hand_over(ctx, modules, group.targets[0], _cast(tensors[0], dtype), qctx)
            return
        converter = copy.deepcopy(group.converter)
        for source, pattern, tensor in zip(group.sources, group.patterns, tensors):
            converter.add_tensor(group.targets[0], source, pattern, _cast(tensor, dtype))
        produced = converter.convert(group.targets[0], model=model, config=model.config)
        for name, value in produced.items():
            value = value[0] if isinstance(value, list) else value
            self._hand_over(ctx, modules, name, _cast(value, self.dtype_for(plan, name)), qctx)

    @staticmethod
    def device_for(plan: Plan, name: str) -> Any:
        return placed_device(name, plan.device_map)

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


def _castable(info: Any, dtype: Any) -> bool:
    """Whether readers can cast this tensor chunk by chunk: float to float, whole elements per chunk."""
    import torch

    stored = getattr(torch, _stored_name(info), None)
    return stored is not None and stored.is_floating_point and dtype.is_floating_point and stored.itemsize <= 8


def _cast(tensor: Any, dtype: Any) -> Any:
    """The planned dtype, cast where the tensor already is (its planned device)."""
    return tensor if dtype is None or tensor.dtype == dtype else tensor.to(dtype)


def _dtype_name(dtype: Any) -> str:
    return str(dtype).replace("torch.", "")


def _stored_name(info: Any) -> str:
    from ..safetensors_header import TORCH_DTYPE_NAMES

    return TORCH_DTYPE_NAMES.get(info.dtype, info.dtype)


@contextlib.contextmanager
def _progress(total: int, enabled: bool) -> Iterator[Any]:
    """A callable that advances a byte progress bar (tqdm) when enabled; a no-op otherwise."""
    if not enabled:
        yield lambda n: None
        return
    from tqdm.auto import tqdm

    with tqdm(total=total, desc="loading weights", unit="B", unit_scale=True, leave=False) as bar:
        yield bar.update
