"""Reading and validating a checkpoint folder without reading weight data.

Only the 8-byte length prefix and the JSON header of each safetensors file are read (plus the
shard index); the header checks themselves live in ``safetensors_header.py``. A resolver may
hand over headers it fetched remotely (``ResolvedSource.remote_headers``, a plan of a Hub repo
that is not cached): those files need not exist locally and are checked exactly like local ones.
Everything is checked before any weight is loaded: a malformed file gets a
:class:`~loadstone.CheckpointError` naming the file, the field, what was expected and found, and
the fix. See docs/validation.md for the full list.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from ...contract.checkpoint import (
    PICKLE_INDEX,
    PICKLE_SINGLE,
    SAFE_INDEX,
    SAFE_SINGLE,
    CheckpointInventory,
    RemoteHeader,
    TensorInfo,
)
from ...contract.errors import CheckpointError, UnsafeCheckpointError
from ...jsonfile import read_json
from ...safetensors_header import (
    read_safetensors_header,
    remote_safetensors_header,
)


def _hub_blobs(folder: Path) -> Path | None:
    """``.../models--org--name/blobs`` when ``folder`` is a Hugging Face cache snapshot, else ``None``.

    The cache stores every file of a snapshot as a link into the repo's ``blobs`` folder; those
    links leave the snapshot folder legitimately, and nothing else may.
    """
    real = folder.resolve()
    if real.parent.name == "snapshots" and real.parent.parent.name.startswith(("models--", "datasets--")):
        return real.parent.parent / "blobs"
    return None


def _inside(folder: Path, name: str, index: Path) -> Path:
    """The shard ``name`` from ``index``, refused if it leads outside ``folder``."""
    candidate = Path(name)
    if "\x00" in name or not name or candidate.is_absolute() or ".." in candidate.parts:
        raise CheckpointError(
            f"{index.name} names a shard outside the checkpoint folder: {name!r}.", file=index, field="weight_map",
            expected="plain file names inside the checkpoint folder (no '..', no absolute paths)", found=repr(name),
            fix="fix the index: shards must sit next to it (regenerate it with save_pretrained)")
    full = folder / candidate
    try:
        real = full.resolve(strict=False)
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop on older Pythons
        raise CheckpointError(f"{index.name} names a shard whose path cannot be resolved: {name!r}.", file=index,
                              field="weight_map", expected="a file inside the checkpoint folder", found=str(exc),
                              fix="fix the index or the links in the checkpoint folder") from None
    blobs = _hub_blobs(folder)
    if not real.is_relative_to(folder.resolve()) and not (blobs is not None and real.is_relative_to(blobs)):
        raise CheckpointError(
            f"{index.name} names a shard that is a link leading outside the checkpoint folder.", file=index,
            field="weight_map", expected=f"a file inside {folder}", found=f"{name} -> {real}",
            fix="copy the shard into the checkpoint folder instead of linking outside it")
    return full


def read_index(folder: Path, index: Path) -> dict[str, str]:
    """The index's ``weight_map`` (tensor name -> shard file name, spelled as the folder names it:
    ``./model-00001...`` is ``model-00001...``, as transformers reads it)."""
    data = read_json(index, CheckpointError, what="a JSON object with a weight_map",
                     missing=f"{index.name} is missing.", missing_fix="finish the download (or re-save the checkpoint)",
                     repair_fix="regenerate the index with save_pretrained")
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index.name} has no usable weight_map.", file=index, field="weight_map",
                              expected="an object mapping tensor names to shard file names",
                              found=repr(weight_map)[:120], fix="regenerate the index with save_pretrained")
    normal = {shard: _normal_shard_name(shard) for shard in set(weight_map.values())}  # a few shards, many tensors
    return {name: normal[shard] for name, shard in weight_map.items()}


def _normal_shard_name(name: str) -> str:
    """``./shard`` and ``shard`` are one file; anything that is not a plain relative path is left
    as it is for :func:`_inside` to refuse."""
    if not name or "\x00" in name or name.startswith("/"):
        return name
    parts = [p for p in name.split("/") if p not in ("", ".")]
    return "/".join(parts) if parts else name


class _HeaderSource:
    """Reads a weight file's header from the folder, or from what a resolver fetched remotely."""

    def __init__(self, folder: Path, remote: Mapping[str, RemoteHeader] | None):
        # Keyed like the paths _inside() builds (folder / name), so index entries find them.
        self.remote = {folder / name: header for name, header in (remote or {}).items()}
        self.remote_sizes: dict[Path, int] = {}
        self.stats: dict[Path, tuple[int, int]] = {}

    def present(self, path: Path) -> bool:
        return path in self.remote or _is_file(path)

    def read(self, path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
        remote = self.remote.get(path)
        if remote is None:
            found = read_safetensors_header(path)
            stats = _stat(path)
            if stats is not None:  # else gone since the header was read: the load will say so
                self.stats[path] = stats
            return found
        self.remote_sizes[path] = remote.size
        return remote_safetensors_header(path, remote)

    def inventory(self, folder: Path, files: list[Path], tensors: dict[str, TensorInfo], index: Path | None,
                  metadata: dict[str, str]) -> CheckpointInventory:
        return CheckpointInventory(folder, "safetensors", files, tensors, index, metadata, dict(self.remote_sizes),
                                   dict(self.stats))


def inspect_checkpoint(folder: Path, *, allow_pickle: bool = False,
                       remote_headers: Mapping[str, RemoteHeader] | None = None) -> CheckpointInventory:
    """Find and validate the weight files of a model folder (headers only).

    ``remote_headers`` (file name in the folder -> :class:`~loadstone.RemoteHeader`)
    stand in for weight files a resolver did not download; they are validated like local files.
    """
    folder = Path(folder)
    source = _HeaderSource(folder, remote_headers)
    # model.safetensors first, as from_pretrained looks: beside an index (a sharded save left behind
    # by a later single-file one), every engine must read the same files the plan checked.
    if source.present(folder / SAFE_SINGLE):
        tensors, metadata = source.read(folder / SAFE_SINGLE)
        return source.inventory(folder, [folder / SAFE_SINGLE], tensors, None, metadata)
    if _is_file(folder / SAFE_INDEX) or os.path.lexists(folder / SAFE_INDEX):  # not a file: read_index says why
        return _inspect_sharded(folder, folder / SAFE_INDEX, source)
    others = sorted({p for p in folder.glob("*.safetensors") if p.is_file()}
                    | {p for p in source.remote if p.parent == folder and p.suffix == ".safetensors"})
    if len(others) == 1:
        tensors, metadata = source.read(others[0])
        return source.inventory(folder, others, tensors, None, metadata)
    pickles = [folder / PICKLE_INDEX, folder / PICKLE_SINGLE]
    found = next((p for p in pickles if p.is_file()), None)
    if found is not None:
        if not allow_pickle:
            raise UnsafeCheckpointError(
                f"{folder} holds only pickle weights ({found.name}); loading pickle can execute code.",
                file=found, field="weights format", expected="model.safetensors", found=found.name,
                fix="convert the checkpoint to safetensors, or pass allow_pickle=True (CLI: --allow-pickle) "
                    "to read it with torch.load(weights_only=True)")
        index = found if found.name == PICKLE_INDEX else None
        names = sorted(set(read_index(folder, found).values())) if index else [found.name]
        files = [_inside(folder, name, found) if index else found for name in names]
        tensors: dict[str, TensorInfo] = {}
        for f in files:
            if not _is_file(f):
                raise CheckpointError(f"shard {f.name} named by {found.name} is missing.", file=f, field="weight_map",
                                      expected="every shard listed in the index", found="no such file",
                                      fix="finish the download (or re-save the checkpoint)")
            stats = _stat(f)
            tensors.update(read_pickle_tensors(f))
            if stats is not None:
                source.stats[f] = stats
        return CheckpointInventory(folder, "pickle", files, tensors, index, file_stats=dict(source.stats))
    raise CheckpointError(
        f"{folder} holds no weights.", file=folder, field="weight files",
        expected=f"{SAFE_SINGLE} or {SAFE_INDEX} (or pytorch_model.bin with allow_pickle=True)",
        found=", ".join(sorted(p.name for p in folder.iterdir())[:12]) or "an empty folder",
        fix="point at the folder that save_pretrained wrote, or finish downloading it")


def _inspect_sharded(folder: Path, index: Path, source: _HeaderSource) -> CheckpointInventory:
    weight_map = read_index(folder, index)
    shards: dict[str, Path] = {}
    for name in weight_map.values():
        if name not in shards:
            shards[name] = _inside(folder, name, index)
    tensors: dict[str, TensorInfo] = {}
    metadata: dict[str, str] = {}
    for name, path in shards.items():
        if not source.present(path):
            raise CheckpointError(
                f"shard {name} named by {index.name} is missing.", file=path, field="weight_map",
                expected="every shard listed in the index", found="no such file",
                fix="finish the download (or re-save the checkpoint)")
        shard_tensors, shard_meta = source.read(path)
        metadata.update(shard_meta)
        for tname, info in shard_tensors.items():
            if tname in tensors:
                raise CheckpointError(
                    f"tensor {tname!r} is stored in two shards: {tensors[tname].file.name} and {path.name}.",
                    file=path, field=f"header[{tname!r}]", expected="each tensor in exactly one shard",
                    found=f"{tensors[tname].file.name} and {path.name}",
                    fix="re-save the checkpoint; one copy may be stale")
            tensors[tname] = info
    shard_names = {shard: Path(shard).name for shard in shards}
    for tname, shard in weight_map.items():
        info = tensors.get(tname)
        if info is None or info.file.name != shard_names[shard]:
            where = f"it is in {info.file.name}" if info else "no shard holds it"
            raise CheckpointError(
                f"{index.name} says tensor {tname!r} is in {shard}, but {where}.", file=index,
                field=f"weight_map[{tname!r}]", expected=f"{tname} in {shard}", found=where,
                fix="regenerate the index (or re-download the shard)")
    return source.inventory(folder, [shards[n] for n in sorted(shards)], tensors, index, metadata)


def _stat(path: Path) -> tuple[int, int] | None:
    """``(size, mtime_ns)``, what a load compares to see whether the file changed since the plan."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):  # a name too long for the filesystem is simply not there
        return False


_TORCH_TO_SAFETENSORS = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64", "int64": "I64",
                         "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


def read_pickle_tensors(path: Path) -> dict[str, TensorInfo]:
    """Names, shapes and dtypes of a pickle checkpoint (only read when the caller allowed pickle).

    Unpickled with ``torch.load(weights_only=True)`` onto the meta device (memory-mapped when the
    file is a zip archive), so no tensor data is read and no code in the file can run. Offsets in
    the returned infos are synthetic: ``[0, nbytes)``.
    """
    import pickle
    import zipfile

    import torch

    try:
        state = torch.load(path, map_location="meta", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(
            f"{path.name} holds more than plain tensors, and torch.load(weights_only=True) refused to unpickle it.",
            file=path, field="pickle contents", expected="a state dict of tensors",
            found=(str(exc).strip().splitlines() or [type(exc).__name__])[-1][:200],
            fix="do not load this file with weights_only=False unless you trust whoever made it (it may run code); "
                "ask for a safetensors copy of the checkpoint") from None
    except Exception as exc:  # torch raises many types for corrupt archives
        raise CheckpointError(f"{path.name} is not a readable PyTorch checkpoint.", file=path, field="file contents",
                              expected="a file written by torch.save", found=f"{type(exc).__name__}: {exc}"[:200],
                              fix="re-download the file, or re-save the checkpoint as safetensors") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise CheckpointError(f"{path.name} is not a state dict.", file=path, field="file contents",
                              expected="a dict of tensor name -> tensor", found=type(state).__name__,
                              fix="save the model with save_pretrained (it writes model.safetensors)")
    return {name: TensorInfo(name, path, _TORCH_TO_SAFETENSORS.get(str(t.dtype).replace("torch.", ""), "?"),
                             tuple(t.shape), 0, t.numel() * t.element_size()) for name, t in state.items()}
