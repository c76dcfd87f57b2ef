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


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate one safetensors file's header; returns (tensors, metadata)."""
    path = Path(path)
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
    except ValueError as exc:
        raise CheckpointError(f"{path.name}'s header is not valid JSON.", file=path, field="header",
                              expected="a JSON object", found=str(exc),
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
    data_size = size - 8 - n
    tensors = {name: _tensor_info(path, name, entry, data_size) for name, entry in header.items()}
    _check_layout(path, tensors, data_size)
    return tensors, metadata


def _tensor_info(path: Path, name: str, entry: Any, data_size: int) -> TensorInfo:
    def bad(field_: str, expected: str, found: Any) -> CheckpointError:
        return CheckpointError(f"{path.name}: tensor {name!r} has an invalid {field_}.", file=path,
                               field=f"header[{name!r}].{field_}", expected=expected, found=repr(found)[:120],
                               fix="re-save the checkpoint with the safetensors library")

    if not isinstance(entry, dict):
        raise bad("entry", "an object with dtype, shape and data_offsets", entry)
    dtype = entry.get("dtype")
    if dtype not in SAFETENSORS_DTYPE_BITS:
        raise bad("dtype", "one of " + ", ".join(sorted(SAFETENSORS_DTYPE_BITS)), dtype)
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise bad("shape", "a list of non-negative integers", shape)
    offsets = entry.get("data_offsets")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
            or offsets[0] > offsets[1]):
        raise bad("data_offsets", "[begin, end] with 0 <= begin <= end", offsets)
    if offsets[1] > data_size:
        raise CheckpointError(
            f"{path.name}: tensor {name!r} ends past the end of the file.", file=path,
            field=f"header[{name!r}].data_offsets", expected=f"end <= {data_size} (bytes of data in the file)",
            found=f"end = {offsets[1]}",
            fix="the file is truncated; re-download or re-save the checkpoint")
    bits = math.prod(shape) * SAFETENSORS_DTYPE_BITS[dtype]
    expected = (bits + 7) // 8
    if offsets[1] - offsets[0] != expected:
        raise CheckpointError(
            f"{path.name}: tensor {name!r} spans {offsets[1] - offsets[0]} bytes but shape {shape} in {dtype} "
            f"needs {expected}.", file=path, field=f"header[{name!r}].data_offsets",
            expected=f"{expected} bytes", found=f"{offsets[1] - offsets[0]} bytes",
            fix="re-save the checkpoint; its header is inconsistent")
    return TensorInfo(name, path, dtype, tuple(shape), offsets[0], offsets[1])


def _check_layout(path: Path, tensors: dict[str, TensorInfo], data_size: int) -> None:
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
                f"{path.name}: {info.start - cursor} unused bytes lie before tensor {info.name!r}.",
                file=path, field=f"header[{info.name!r}].data_offsets", expected=f"begin = {cursor}",
                found=f"begin = {info.start}", fix="re-save the checkpoint; its header is corrupt")
        cursor, previous = info.end, info.name
    if cursor < data_size:
        raise CheckpointError(
            f"{path.name} has {data_size - cursor} bytes after its last tensor.", file=path,
            field="file size", expected=f"{8 + cursor} bytes of data after the header length prefix and header",
            found=f"{8 + data_size} bytes", fix="the file was appended to or is corrupt; re-save the checkpoint")


def _inside(folder: Path, name: str, index: Path) -> Path:
    candidate = Path(name)
    if candidate.is_absolute() or ".." in candidate.parts:
        raise CheckpointError(
            f"{index.name} names a shard outside the checkpoint folder.", file=index, field="weight_map",
            expected="file names inside the checkpoint folder", found=name,
            fix="fix the index: shards must sit next to it")
    full = folder / candidate
    try:
        real = full.resolve(strict=False)
        if not real.is_relative_to(folder.resolve()):
            raise CheckpointError(
                f"{index.name} names a shard that is a link leading outside the checkpoint folder.", file=index,
                field="weight_map", expected=f"a file inside {folder}", found=f"{name} -> {real}",
                fix="copy the shard into the checkpoint folder instead of linking outside it")
    except OSError as exc:  # pragma: no cover - exotic filesystems
        raise CheckpointError(f"cannot resolve shard {name}: {exc}", file=index, field="weight_map") from None
    return full


def read_index(folder: Path, index: Path) -> dict[str, str]:
    try:
        data = json.loads(index.read_text(encoding="utf-8"), object_pairs_hook=_no_duplicates)
    except _DuplicateKey as dup:
        raise CheckpointError(f"{index.name} lists the tensor {dup.key!r} twice.", file=index,
                              field=f"weight_map[{dup.key!r}]", expected="each tensor in one shard",
                              found="two entries", fix="fix or regenerate the index") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{index.name} is not valid JSON.", file=index, field="(whole file)",
                              expected="a JSON object with a weight_map", found=str(exc)[:120],
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
        files = ([folder / name for name in sorted(set(read_index(folder, found).values()))]
                 if found.name == PICKLE_INDEX else [found])
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"shard {f.name} named by {found.name} is missing.", file=f,
                                      field="weight_map", fix="download the missing shard")
        return CheckpointInventory(folder, "pickle", files, {}, found if found.name == PICKLE_INDEX else None)
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
        if not path.is_file():
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

