"""Parsing and validating one safetensors header, read from a local file or fetched remotely.

A local file and a header fetched with HTTP range requests (see ``RemoteHeader``) go through the
same checks: :func:`validate_header` takes the raw header bytes plus the sizes they claim to
describe, so a malformed file gets the same :class:`~loadstone.CheckpointError` wherever it lives.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .contract.checkpoint import RemoteHeader, TensorInfo
from .contract.errors import CheckpointError

# Same limit the safetensors library enforces; a larger header is refused before parsing it.
MAX_HEADER_BYTES = 100_000_000

SAFETENSORS_DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8,
    "F8_E8M0": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64, "C64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}
LFS_POINTER_PREFIX = b"version https://git-lfs"

#: safetensors dtype code -> torch dtype name (codes torch has no dtype for are absent)
TORCH_DTYPE_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                     "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
                     "U16": "uint16", "U32": "uint32", "U64": "uint64", "C64": "complex64",
                     "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E4M3FNUZ": "float8_e4m3fnuz",
                     "F8_E5M2FNUZ": "float8_e5m2fnuz", "F8_E8M0": "float8_e8m0fnu"}




def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` for ``json.loads``: plain ``json`` keeps the last of two equal keys silently."""
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise DuplicateKey(key)
        seen[key] = value
    return seen


class DuplicateKey(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def unreadable(path: Path, exc: OSError) -> CheckpointError:
    return CheckpointError(f"{path.name} cannot be read: {exc.strerror or exc}.", file=path, field="file",
                           expected="a readable regular file", found=type(exc).__name__,
                           fix="check the file's permissions and that the download finished")


def _lfs_error(path: Path) -> CheckpointError:
    return CheckpointError(
        f"{path.name} is a Git LFS pointer file, not the weights it points to.",
        file=path, field="file contents", expected="safetensors data",
        found=f"a {path.stat().st_size}-byte text file starting with 'version https://git-lfs'",
        fix="run `git lfs pull` in the checkout (or download the file with huggingface_hub)")


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate one local safetensors file's header; returns (tensors, metadata)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            if size >= len(LFS_POINTER_PREFIX) and fh.read(len(LFS_POINTER_PREFIX)) == LFS_POINTER_PREFIX:
                raise _lfs_error(path)
            fh.seek(0)
            n = int.from_bytes(fh.read(8), "little") if size >= 8 else None
            check_header_length(path, n, size)
            raw = fh.read(n)
    except OSError as exc:
        raise unreadable(path, exc) from None
    return validate_header(path, raw, file_size=size)


def remote_safetensors_header(path: Path, remote: "RemoteHeader") -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """The same checks as :func:`read_safetensors_header`, on a header fetched without the file.

    ``path`` is where the file would sit in the snapshot folder (it names the file in errors).
    """
    check_header_length(path, remote.header_length, remote.size)
    if len(remote.header) != remote.header_length:
        # The server sent fewer bytes than the range asked for: the same as a file cut short.
        raise CheckpointError(
            f"{path.name}'s header could not be read in full from {remote.url or 'the remote'}.", file=path,
            field="header", expected=f"{remote.header_length} bytes", found=f"{len(remote.header)} bytes",
            fix="retry; if it persists the remote file is truncated (re-upload it)")
    return validate_header(path, remote.header, file_size=remote.size)


def check_header_length(path: Path, n: int | None, size: int) -> None:
    """The 8-byte length prefix ``n`` (``None``: the file is shorter than 8 bytes) against the file size."""
    if n is None or size < 8:
        raise CheckpointError(
            f"{path.name} is too short to be a safetensors file.", file=path, field="header length",
            expected="at least 8 bytes (the header length prefix)", found=f"{size} bytes",
            fix="re-download or re-save the checkpoint; the file is truncated or empty")
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


def validate_header(path: Path, raw: bytes, *, file_size: int) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse the JSON header ``raw`` of a file of ``file_size`` bytes and check every tensor and the layout."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{path.name}'s header is not UTF-8 text.", file=path, field="header",
                              expected="UTF-8 JSON", found=f"invalid byte at offset {exc.start}",
                              fix="the file is corrupt or not a safetensors file; re-save it") from None
    try:
        header = json.loads(text, object_pairs_hook=no_duplicates)
    except DuplicateKey as dup:
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
    _check_layout(path, tensors, header_bytes=len(raw), file_size=file_size)
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
