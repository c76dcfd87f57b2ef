"""The ``transformers`` engine: ``AutoModel*.from_pretrained`` with the plan's exact choices
(device map, dtype, quantization config), then transformers' loading info checked strictly.

It runs every plan transformers can: pickle checkpoints (``allow_pickle``), disk offload, and
quantization backends that only offer a ``transformers_config``. It cannot run a backend that
converts weights only itself, nor a pre-quantized format transformers does not know (it would
load the packed tensors as plain weights).
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Any, Iterator

from ..contract.checkpoint import SAFE_SINGLE
from ..contract.engines import Engine, EngineContext
from ..contract.errors import LoadstoneError, WeightsMismatchError
from ..contract.plan import Plan
from ..contract.units import format_size


@contextlib.contextmanager
def transformers_progress(enabled: bool) -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if was_enabled else hf_logging.disable_progress_bar)()


@contextlib.contextmanager
def safetensors_read_not_mapped(inventory: Any = None,
                                device_map: dict[str, Any] | None = None) -> Iterator[frozenset[str]]:
    """``from_pretrained`` reads safetensors with ``pread`` instead of through a memory map.

    A file truncated while mapped kills the process with SIGBUS at the next read of a lost page;
    ``pread`` returns short instead, which becomes a :class:`~loadstone.CheckpointError` naming
    the file. Files are opened with safetensors' ``pread`` backend (transformers' own choice on MPS
    and Windows) for their keys and slices; a whole tensor read for the CPU, which is every tensor
    of an unsharded load, comes from :class:`~loadstone.engines.reader.SafetensorsReader` where the
    plan's ``inventory`` lists it: one ``preadv`` into the tensor's memory, with the GIL released
    (transformers reads in four threads), where safetensors' backend took 2-8x as long as the
    memory map. A tensor the plan's ``device_map`` puts on a CUDA device is read into pinned
    memory where its block will be reused (:func:`tensors_to_pin`), so that transformers' copy of
    it to the GPU is a DMA, not a copy through the driver's staging buffers; the pinned blocks are
    given back when the load ends (docs/benchmarks.md has the figures); it yields the names of
    those tensors. In force for the
    duration of the call (under ``TRANSFORMERS_GLOBAL_STATE``); if transformers stops opening
    files through ``modeling_utils.safe_open``, files are mapped again (docs/validation.md says
    what then remains).
    """
    import transformers.modeling_utils as modeling_utils

    from .reader import SafetensorsReader

    mapped_open = getattr(modeling_utils, "safe_open", None)
    if mapped_open is None:
        yield frozenset()
        return
    reader = SafetensorsReader(inventory) if inventory is not None and inventory.tensors else None
    pinned = tensors_to_pin(inventory, device_map) if reader is not None else frozenset()

    def read_with_pread(filename: Any, framework: str, device: Any = "cpu", **kwargs: Any) -> Any:
        handle = mapped_open(filename, framework, device=device, **{**kwargs, "backend": "pread"})
        if reader is None or framework != "pt" or str(device) != "cpu":
            return handle
        path = Path(filename)
        reader.open(path)  # now, as safetensors opened it: a file changed since the plan is refused here
        return _PreadFile(handle, reader, path, pinned)

    modeling_utils.safe_open = read_with_pread
    try:
        yield pinned
    finally:
        modeling_utils.safe_open = mapped_open
        if reader is not None:
            reader.close()
        if pinned:
            release_pinned_blocks()


# Pinning memory costs more than the DMA it buys, unless the block is used again: torch's caching
# host allocator hands out power-of-two blocks, and a tensor is read into pinned memory only where
# at least this many tensors bound for the GPU share its block size (an 8B Llama's 1 GiB embedding
# and head do not; its 96 MLP weights do).
PINNED_REUSE = 4


def tensors_to_pin(inventory: Any, device_map: dict[str, Any] | None) -> frozenset[str]:
    """The names of ``inventory``'s tensors to read into pinned memory: those that ``device_map``
    places on a CUDA device (an index or ``"cuda..."``) whose block size :data:`PINNED_REUSE` of
    them share. A name the map does not cover is not among them (it is read into plain memory)."""
    if not device_map or inventory is None:
        return frozenset()
    from collections import defaultdict

    from ..contract.placement import placed_device

    by_block: dict[int, list[str]] = defaultdict(list)
    for name, info in inventory.tensors.items():
        if placed_device(name, device_map).startswith("cuda"):
            by_block[max(info.nbytes - 1, 0).bit_length()].append(name)
    return frozenset(name for names in by_block.values() if len(names) >= PINNED_REUSE for name in names)


def release_pinned_blocks() -> None:
    """Give the page-locked blocks torch's caching host allocator keeps back to the system (the
    GPU-bound tensors were read into them; the model holds none of them once it is on the GPU).
    The cache is the process's: blocks the caller's own code freed earlier go back too (blocks
    still in use stay)."""
    import torch

    empty = getattr(torch._C, "_host_emptyCache", None) or getattr(torch._C, "_accelerator_emptyHostCache", None)
    if empty is not None and torch.cuda.is_initialized():
        empty()


class _PreadFile:
    """A safetensors file handle whose whole-tensor reads go through loadstone's reader."""

    def __init__(self, handle: Any, reader: Any, path: Path, pinned: frozenset[str] = frozenset()):
        self._handle, self._reader, self._path, self._pinned = handle, reader, path, pinned

    def _info(self, name: str) -> Any:
        info = self._reader.inventory.tensors.get(name)
        return info if info is not None and Path(info.file) == self._path else None

    def get_slice(self, name: str) -> Any:
        info = self._info(name)
        sliced = self._handle.get_slice(name)
        return sliced if info is None else _PreadSlice(sliced, self._reader, info, name in self._pinned)

    def get_tensor(self, name: str) -> Any:
        info = self._info(name)
        return self._handle.get_tensor(name) if info is None else self._reader.read(info, pinned=name in self._pinned)

    def __enter__(self) -> "_PreadFile":
        self._handle.__enter__()
        return self

    def __exit__(self, *exc: Any) -> Any:
        return self._handle.__exit__(*exc)

    def __getattr__(self, name: str) -> Any:  # keys(), metadata(), offset_keys() ...
        return getattr(self._handle, name)


class _PreadSlice:
    """safetensors' lazy slice; ``[...]`` (the whole tensor) is read by loadstone's reader, any
    other index (a shard of the tensor) by safetensors' own ``pread`` backend."""

    def __init__(self, sliced: Any, reader: Any, info: Any, pinned: bool = False):
        self._slice, self._reader, self._info, self._pinned = sliced, reader, info, pinned

    def __getitem__(self, index: Any) -> Any:
        if index is Ellipsis or (isinstance(index, tuple) and len(index) == 1 and index[0] is Ellipsis):
            return self._reader.read(self._info, pinned=self._pinned)
        return self._slice[index]

    def __getattr__(self, name: str) -> Any:  # get_shape(), get_dtype()
        return getattr(self._slice, name)


TRANSFORMERS_READERS = ("pread", "mmap")


class TransformersEngine(Engine):
    name = "transformers"
    preference = 900
    description = "transformers' from_pretrained with the plan's device map, dtype and quantization config"

    def option_help(self) -> dict[str, str]:
        return {"reader": "pread (default: a checkpoint file truncated or rewritten during the load is a "
                          "CheckpointError; tensors bound for a GPU pass through reused page-locked blocks, and big "
                          "ones are read in parallel parts) or mmap (transformers' own memory map: no copy into host memory, but a file "
                          "truncated mid-load kills the process with SIGBUS; docs/validation.md)"}

    def normalize_options(self, options: dict[str, Any]) -> dict[str, Any]:
        out = super().normalize_options(options)
        if out.get("reader", "pread") not in TRANSFORMERS_READERS:
            from ..contract.errors import OptionError

            raise OptionError(f"engine option reader={out['reader']!r} is not a reader of the transformers engine.",
                              field="engine option reader", expected=", ".join(TRANSFORMERS_READERS),
                              found=repr(out["reader"]), fix="pass reader=mmap, or drop the option")
        return out

    def problems(self, plan: Plan) -> list[str]:
        qctx = plan.quantization
        backend = plan.quantization_backend
        converted = plan.tensor_map.converted if plan.tensor_map is not None else frozenset()
        problems = []
        inventory = plan.inventory
        if inventory.format == "safetensors" and inventory.index_file is None and inventory.files \
                and inventory.files[0].name != SAFE_SINGLE:
            problems.append(f"from_pretrained reads {SAFE_SINGLE} (or a shard index), and this checkpoint's only "
                            f"weights file is {inventory.files[0].name}")
        if inventory.index_file is not None and not _index_has_metadata(inventory.index_file):
            problems.append(f"from_pretrained needs a \"metadata\" object in {inventory.index_file.name}, and this "
                            f"index has none")
        if not qctx.pre_quantized and converted and plan.quantization_config is None:
            problems.append(f"quantization backend {backend.name!r} converts weights only itself (load_tensor), which "
                            f"from_pretrained cannot call")
        if qctx.pre_quantized:
            from transformers.quantizers.auto import AutoQuantizationConfig

            method = str((qctx.checkpoint_config or {}).get("quant_method", "")).lower()
            try:  # transformers' own resolution of a checkpoint's quantization_config
                AutoQuantizationConfig.from_dict(dict(qctx.checkpoint_config or {}))
            except (ValueError, KeyError, TypeError):
                problems.append(f"transformers does not know the pre-quantized format {method!r} (it would load the "
                                f"packed tensors as plain weights)")
        return problems

    def kwargs(self, plan: Plan, offload_folder: Any = None) -> dict[str, Any]:
        """The keyword arguments for ``from_pretrained``; ``offload_folder`` is this load's own
        (``EngineContext.offload_folder``), else the request's."""
        request = plan.request
        kwargs: dict[str, Any] = {
            "config": copy.deepcopy(plan.config),
            "dtype": plan.torch_dtype,
            "device_map": dict(plan.device_map),
            "local_files_only": True,
            "trust_remote_code": request.trust_remote_code,
            "use_safetensors": plan.inventory.format == "safetensors",
            "weights_only": True,
            "output_loading_info": True,
        }
        if plan.quantization_config is not None:
            kwargs["quantization_config"] = plan.quantization_config
        if offload_folder or request.offload_folder:
            kwargs["offload_folder"] = str(offload_folder or request.offload_folder)
        if request.attn_implementation:
            kwargs["attn_implementation"] = request.attn_implementation
        return kwargs

    def load(self, plan: Plan, ctx: EngineContext) -> Any:
        from ..faults import TRANSFORMERS_GLOBAL_STATE

        kwargs = self.kwargs(plan, ctx.offload_folder)
        # The lock: from_pretrained patches process-wide state (see faults.py), and so do we.
        mapped = plan.engine_options.get("reader") == "mmap"
        if mapped:
            ctx.note("engine transformers: reader=mmap: safetensors files are memory-mapped (a file truncated during "
                     "the load kills the process)")
        reading = contextlib.nullcontext(frozenset()) if mapped else safetensors_read_not_mapped(plan.inventory,
                                                                                                  plan.device_map)
        with TRANSFORMERS_GLOBAL_STATE, transformers_progress(ctx.progress), reading as pinned:
            if pinned:
                ctx.note(f"engine transformers: {len(pinned)} of the tensors bound for the GPU "
                         f"({format_size(sum(plan.inventory.tensors[name].nbytes for name in pinned))}) are read into "
                         f"page-locked blocks that are reused and given back after the load (DMA copies)")
            try:
                model, info = plan.auto_class.from_pretrained(str(plan.sources.base.path), **kwargs)
            except LoadstoneError:
                raise
            except RuntimeError as exc:
                if "size mismatch" in str(exc) or "shape" in str(exc).lower():
                    raise WeightsMismatchError(
                        f"the checkpoint's tensors do not fit the model: {exc}", file=plan.sources.base.path,
                        field="tensor shapes", fix="check that config.json belongs to these weights") from exc
                raise
        check_loading_info(info, plan)
        return model


def _index_has_metadata(index: Any) -> bool:
    """transformers' shard loader copies the index's ``metadata`` object and adds to it: an index
    without one (the native engine needs only ``weight_map``) fails there with a KeyError."""
    from ..contract.errors import CheckpointError
    from ..jsonfile import read_json

    try:
        data = read_json(index, CheckpointError, what="a shard index", missing="", missing_fix="", repair_fix="")
    except CheckpointError:
        return False
    return isinstance(data, dict) and isinstance(data.get("metadata"), dict)


def check_loading_info(info: dict[str, Any], plan: Plan) -> None:
    """Missing, unexpected or mismatched tensors are errors, never random weights."""
    missing = sorted(info.get("missing_keys") or [])
    unexpected = sorted(info.get("unexpected_keys") or [])
    mismatched = sorted(str(m) for m in (info.get("mismatched_keys") or []))
    # A new task head (score.weight for a causal-LM checkpoint loaded for classification) is expected;
    # the plan stage already reported it (see stages/plan/tensormap.head_keys).
    if missing or unexpected:
        from ..stages.plan.choices import choose_task, task_asked
        from ..stages.plan.tensormap import head_keys

        skeleton = plan.build_skeleton()
        # a head the checkpoint lacks is new only where the task was asked for (see build_tensor_map)
        new = head_keys(skeleton, plan.config, missing) if task_asked(choose_task(plan.request, plan.sources)[1]) \
            else set()
        dropped = head_keys(skeleton, plan.config, unexpected)
        missing, unexpected = [k for k in missing if k not in new], [k for k in unexpected if k not in dropped]
    if not (missing or unexpected or mismatched):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (would be randomly initialised): {', '.join(missing[:8])}"
                     + (" ..." if len(missing) > 8 else ""))
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected: {', '.join(unexpected[:8])}" + (" ..." if len(unexpected) > 8 else ""))
    if mismatched:
        parts.append(f"{len(mismatched)} with the wrong shape: {', '.join(mismatched[:8])}")
    arch = plan.config.architectures[0] if getattr(plan.config, "architectures", None) else "the model"
    raise WeightsMismatchError(
        f"the checkpoint does not match {arch}: " + "; ".join(parts) + ".", file=plan.sources.base.path,
        field="tensor names", expected="exactly the tensors the architecture in config.json defines (tied weights "
        "excepted)", found="; ".join(parts), fix="check that config.json and the weights belong together (same "
        "model size and type), or re-save the checkpoint")
