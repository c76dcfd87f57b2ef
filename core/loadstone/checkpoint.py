"""Reading and validating a checkpoint folder without reading weight data.

Only the 8-byte length prefix and the JSON header of each safetensors file are read (plus the
shard index). Everything is checked before any weight is loaded: a malformed file gets a
:class:`~loadstone.CheckpointError` naming the file, the field, what was expected and found, and
the fix. See docs/validation.md for the full list.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CheckpointError, UnsafeCheckpointError

# Same limit the safetensors library enforces; a larger header is refused before parsing it.
MAX_HEADER_BYTES = 100_000_000

SAFETENSORS_DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8,
    "F8_E8M0": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64, "C64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}
FLOAT_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
LFS_POINTER_PREFIX = b"version https://git-lfs"


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class CheckpointInventory:
    """What a checkpoint folder holds, read from headers only."""

    folder: Path
    format: str  # "safetensors" | "pickle"
    files: list[Path]
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    index_file: Path | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    def dominant_float_dtype(self) -> str | None:
        """The floating dtype holding most bytes (``"bfloat16"``...), ``None`` if unknown."""
        per: dict[str, int] = {}
        for t in self.tensors.values():
            if t.dtype in FLOAT_DTYPES:
                per[t.dtype] = per.get(t.dtype, 0) + t.nbytes
        return FLOAT_DTYPES[max(per, key=per.get)] if per else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "folder": str(self.folder), "format": self.format,
            "files": [f.name for f in self.files], "tensors": len(self.tensors),
            "bytes": self.total_bytes, "index": self.index_file.name if self.index_file else None,
        }


def _is_lfs_pointer(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(len(LFS_POINTER_PREFIX)) == LFS_POINTER_PREFIX


def _lfs_error(path: Path) -> CheckpointError:
    return CheckpointError(
        f"{path.name} is a Git LFS pointer file, not the weights it points to.",
        file=path, field="file contents", expected="safetensors data",
        found=f"a {path.stat().st_size}-byte text file starting with 'version https://git-lfs'",
        fix="run `git lfs pull` in the checkout (or download the file with huggingface_hub)")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


class _DuplicateKey(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _unreadable(path: Path, exc: OSError) -> CheckpointError:
    return CheckpointError(f"{path.name} cannot be read: {exc.strerror or exc}.", file=path, field="file",
                           expected="a readable regular file", found=type(exc).__name__,
                           fix="check the file's permissions and that the download finished")


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate one safetensors file's header; returns (tensors, metadata)."""
    path = Path(path)
    try:
        return _read_header(path)
    except OSError as exc:
        raise _unreadable(path, exc) from None


def _read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    size = path.stat().st_size
    if size >= len(LFS_POINTER_PREFIX) and _is_lfs_pointer(path):
        raise _lfs_error(path)
    if size < 8:
        raise CheckpointError(
            f"{path.name} is too short to be a safetensors file.", file=path, field="header length",
            expected="at least 8 bytes (the header length prefix)", found=f"{size} bytes",
            fix="re-download or re-save the checkpoint; the file is truncated or empty")
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        if n > MAX_HEADER_BYTES:
            raise CheckpointError(
                f"{path.name} declares a {n}-byte header, larger than the safetensors limit.",
                file=path, field="header length", expected=f"at most {MAX_HEADER_BYTES} bytes (the format's limit)",
                found=f"{n} bytes", fix="the file is corrupt or not a safetensors file; re-download or re-save it")
        if n > size - 8:
            raise CheckpointError(
                f"{path.name} declares a header that runs past the end of the file.",
                file=path, field="header length", expected=f"at most {size - 8} bytes (file size minus 8)",
                found=f"{n} bytes", fix="re-download or re-save the checkpoint; the file is truncated or corrupt")
        raw = fh.read(n)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{path.name}'s header is not UTF-8 text.", file=path, field="header",
                              expected="UTF-8 JSON", found=f"invalid byte at offset {exc.start}",
                              fix="the file is corrupt or not a safetensors file; re-save it") from None
    try:
        header = json.loads(text, object_pairs_hook=_no_duplicates)
    except _DuplicateKey as dup:
        raise CheckpointError(f"{path.name} names the tensor {dup.key!r} twice in its header.", file=path,
                              field=f"header[{dup.key!r}]", expected="unique tensor names",
                              found="a duplicate name", fix="re-save the checkpoint with unique tensor names") from None
    except (ValueError, RecursionError) as exc:  # RecursionError: absurdly nested JSON
        raise CheckpointError(f"{path.name}'s header is not valid JSON.", file=path, field="header",
                              expected="a JSON object", found=str(exc)[:160] or type(exc).__name__,
                              fix="the file is corrupt or not a safetensors file; re-save it") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path.name}'s header is not a JSON object.", file=path, field="header",
                              expected="a JSON object", found=type(header).__name__,
                              fix="the file is corrupt or not a safetensors file; re-save it")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path.name}'s __metadata__ must map strings to strings.", file=path,
                              field="__metadata__", expected="{str: str}", found=repr(metadata)[:80],
                              fix="re-save the checkpoint")
    tensors = {name: _tensor_info(path, name, entry) for name, entry in header.items()}
    _check_layout(path, tensors, header_bytes=n, file_size=size)
    return tensors, metadata


def _tensor_info(path: Path, name: str, entry: Any) -> TensorInfo:
    def bad(field_: str, expected: str, found: Any) -> CheckpointError:
        return CheckpointError(f"{path.name}: tensor {name!r} has an invalid {field_}.", file=path,
                               field=f"header[{name!r}].{field_}", expected=expected, found=repr(found)[:120],
                               fix="re-save the checkpoint with the safetensors library")

    if not isinstance(entry, dict):
        raise bad("entry", "an object with dtype, shape and data_offsets", entry)
    dtype = entry.get("dtype")
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPE_BITS:
        raise bad("dtype", "one of " + ", ".join(sorted(SAFETENSORS_DTYPE_BITS)), dtype)
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise bad("shape", "a list of non-negative integers", shape)
    offsets = entry.get("data_offsets")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
            or offsets[0] > offsets[1]):
        raise bad("data_offsets", "[begin, end] with 0 <= begin <= end", offsets)
    bits = math.prod(shape) * SAFETENSORS_DTYPE_BITS[dtype]
    expected = (bits + 7) // 8
    if offsets[1] - offsets[0] != expected:
        raise CheckpointError(
            f"{path.name}: tensor {name!r} spans {offsets[1] - offsets[0]} bytes but shape {shape} in {dtype} "
            f"needs {expected}.", file=path, field=f"header[{name!r}].data_offsets",
            expected=f"{expected} bytes", found=f"{offsets[1] - offsets[0]} bytes",
            fix="re-save the checkpoint; its header is inconsistent")
    return TensorInfo(name, path, dtype, tuple(shape), offsets[0], offsets[1])


def _check_layout(path: Path, tensors: dict[str, TensorInfo], *, header_bytes: int, file_size: int) -> None:
    """The tensors must tile the data section exactly: no bytes missing, shared, skipped or extra."""
    data_size = file_size - 8 - header_bytes
    last = max(tensors.values(), key=lambda t: t.end, default=None)
    if last is not None and last.end > data_size:
        raise CheckpointError(
            f"{path.name} is truncated: tensor {last.name!r} ends at byte {last.end} of the data section, "
            f"which holds only {data_size} bytes.", file=path, field="file size",
            expected=f"{8 + header_bytes + last.end} bytes (8 + {header_bytes}-byte header + {last.end} bytes of "
                     f"tensor data)", found=f"{file_size} bytes",
            fix="the download or copy was cut short (or the header's offsets are corrupt); re-download or re-save it")
    cursor = 0
    previous = None
    for info in sorted(tensors.values(), key=lambda t: (t.start, t.end)):
        if info.start < cursor:
            raise CheckpointError(
                f"{path.name}: tensors {previous!r} and {info.name!r} overlap.", file=path,
                field=f"header[{info.name!r}].data_offsets", expected=f"begin >= {cursor}",
                found=f"begin = {info.start}", fix="re-save the checkpoint; its header is corrupt")
        if info.start > cursor:
            raise CheckpointError(
                f"{path.name}: {info.start - cursor} unused bytes lie before tensor {info.name!r} (a gap).",
                file=path, field=f"header[{info.name!r}].data_offsets", expected=f"begin = {cursor}",
                found=f"begin = {info.start}", fix="re-save the checkpoint; its header is corrupt")
        cursor, previous = info.end, info.name
    if cursor < data_size:
        raise CheckpointError(
            f"{path.name} has {data_size - cursor} extra bytes after its last tensor.", file=path,
            field="file size", expected=f"{8 + header_bytes + cursor} bytes (8 + {header_bytes}-byte header + "
                                        f"{cursor} bytes of tensor data)", found=f"{file_size} bytes",
            fix="the file was appended to or is corrupt; re-download or re-save the checkpoint")


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
    try:
        data = json.loads(index.read_bytes().decode("utf-8"), object_pairs_hook=_no_duplicates)
    except OSError as exc:
        raise _unreadable(index, exc) from None
    except _DuplicateKey as dup:
        raise CheckpointError(f"{index.name} lists the tensor {dup.key!r} twice.", file=index,
                              field=f"weight_map[{dup.key!r}]", expected="each tensor in one shard",
                              found="two entries", fix="fix or regenerate the index") from None
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise CheckpointError(f"{index.name} is not valid JSON.", file=index, field="(whole file)",
                              expected="a JSON object with a weight_map", found=str(exc)[:120] or type(exc).__name__,
                              fix="regenerate the index with save_pretrained") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index.name} has no usable weight_map.", file=index, field="weight_map",
                              expected="an object mapping tensor names to shard file names",
                              found=repr(weight_map)[:120], fix="regenerate the index with save_pretrained")
    return weight_map


def inspect_checkpoint(folder: Path, *, allow_pickle: bool = False) -> CheckpointInventory:
    """Find and validate the weight files of a model folder (headers only)."""
    folder = Path(folder)
    if (folder / SAFE_INDEX).is_file():
        return _inspect_sharded(folder, folder / SAFE_INDEX)
    if (folder / SAFE_SINGLE).is_file():
        tensors, metadata = read_safetensors_header(folder / SAFE_SINGLE)
        return CheckpointInventory(folder, "safetensors", [folder / SAFE_SINGLE], tensors, None, metadata)
    others = sorted(p for p in folder.glob("*.safetensors") if p.is_file())
    if len(others) == 1:
        tensors, metadata = read_safetensors_header(others[0])
        return CheckpointInventory(folder, "safetensors", others, tensors, None, metadata)
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
            tensors.update(_pickle_tensors(f))
        return CheckpointInventory(folder, "pickle", files, tensors, index)
    raise CheckpointError(
        f"{folder} holds no weights.", file=folder, field="weight files",
        expected=f"{SAFE_SINGLE} or {SAFE_INDEX} (or pytorch_model.bin with allow_pickle=True)",
        found=", ".join(sorted(p.name for p in folder.iterdir())[:12]) or "an empty folder",
        fix="point at the folder that save_pretrained wrote, or finish downloading it")


def _inspect_sharded(folder: Path, index: Path) -> CheckpointInventory:
    weight_map = read_index(folder, index)
    shards: dict[str, Path] = {}
    for name in weight_map.values():
        if name not in shards:
            shards[name] = _inside(folder, name, index)
    tensors: dict[str, TensorInfo] = {}
    metadata: dict[str, str] = {}
    for name, path in shards.items():
        if not _is_file(path):
            raise CheckpointError(
                f"shard {name} named by {index.name} is missing.", file=path, field="weight_map",
                expected="every shard listed in the index", found="no such file",
                fix="finish the download (or re-save the checkpoint)")
        shard_tensors, shard_meta = read_safetensors_header(path)
        metadata.update(shard_meta)
        for tname, info in shard_tensors.items():
            if tname in tensors:
                raise CheckpointError(
                    f"tensor {tname!r} is stored in two shards: {tensors[tname].file.name} and {path.name}.",
                    file=path, field=f"header[{tname!r}]", expected="each tensor in exactly one shard",
                    found=f"{tensors[tname].file.name} and {path.name}",
                    fix="re-save the checkpoint; one copy may be stale")
            tensors[tname] = info
    for tname, shard in weight_map.items():
        info = tensors.get(tname)
        if info is None or info.file.name != Path(shard).name:
            where = f"it is in {info.file.name}" if info else "no shard holds it"
            raise CheckpointError(
                f"{index.name} says tensor {tname!r} is in {shard}, but {where}.", file=index,
                field=f"weight_map[{tname!r}]", expected=f"{tname} in {shard}", found=where,
                fix="regenerate the index (or re-download the shard)")
    return CheckpointInventory(folder, "safetensors", [shards[n] for n in sorted(shards)], tensors, index, metadata)



def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):  # a name too long for the filesystem is simply not there
        return False


_TORCH_TO_SAFETENSORS = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64", "int64": "I64",
                         "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


def _pickle_tensors(path: Path) -> dict[str, TensorInfo]:
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
