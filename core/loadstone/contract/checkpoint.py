"""Value types describing a checkpoint as read from headers: one tensor (:class:`TensorInfo`), a
folder's inventory (:class:`CheckpointInventory`), and a header fetched without its file
(:class:`RemoteHeader`). Part of the contract: plans, engines and resolvers exchange them."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CheckpointError


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as a safetensors header describes it: its file, dtype code (``"BF16"``), shape
    and byte range ``[start, end)`` in the file's data section."""

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


@dataclass(frozen=True)
class RemoteHeader:
    """A safetensors file's header read without downloading the file (HTTP range requests).

    ``size`` is the whole file's size in bytes; ``header_length`` the length its 8-byte prefix
    declares (``None`` when the file is shorter than 8 bytes); ``header`` the JSON header bytes
    that were fetched (empty when the declared length was implausible, so the kernel reports it
    exactly as for a local file); ``url`` where it was read, for messages.
    """

    size: int
    header_length: int | None
    header: bytes
    url: str = ""


FLOAT_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"


@dataclass
class CheckpointInventory:
    """What a checkpoint folder holds, read from headers only.

    ``remote_sizes`` maps the files whose headers were fetched remotely (not present in
    ``folder``) to their sizes; empty when every header was read from a local file.
    """

    folder: Path
    format: str  # "safetensors" | "pickle"
    files: list[Path]
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    index_file: Path | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    remote_sizes: dict[Path, int] = field(default_factory=dict)
    #: each local weight file's ``(size, mtime_ns)`` when its header was read: a reader refuses a
    #: file that changed since (the plan would no longer describe it)
    file_stats: dict[Path, tuple[int, int]] = field(default_factory=dict)

    def changed_file(self, moment: str, among: Any = None) -> CheckpointError | None:
        """The first weight file whose size or mtime differs from ``file_stats`` (or that is gone),
        as the error to raise; ``None`` when every recorded file is as the plan read it.

        ``moment`` completes the message (``"during the load"``); ``among`` limits the check to
        those paths.
        """
        wanted = None if among is None else {Path(p) for p in among}
        for path, (size, mtime_ns) in self.file_stats.items():
            if wanted is not None and path not in wanted:
                continue
            try:
                st = os.stat(path)
            except OSError as exc:
                return CheckpointError(
                    f"{path.name} disappeared {moment}: {exc.strerror or exc}.", file=path, field="file",
                    expected=f"the {size}-byte file the plan read", found="no readable file",
                    fix="do not move, delete or rewrite a checkpoint while it loads; load again once it is back")
            if (st.st_size, st.st_mtime_ns) != (size, mtime_ns):
                return changed_file_error(path, (size, mtime_ns), (st.st_size, st.st_mtime_ns), moment)
        return None

    @property
    def headers(self) -> str:
        """``"remote"`` when the weight headers were fetched without the files, else ``"local"``."""
        return "remote" if self.remote_sizes else "local"

    @property
    def total_bytes(self) -> int:
        # Remote files are not in the folder: stat() would fail (or find a stale partial download).
        return sum(self.remote_sizes[f] if f in self.remote_sizes else f.stat().st_size for f in self.files)

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
            "headers": self.headers,
        }


def changed_file_error(path: Path, expected: tuple[int, int], found: tuple[int, int], moment: str) -> CheckpointError:
    """A weight file is not the one the plan read its header from: truncated, grown or rewritten."""
    (size, mtime), (now_size, now_mtime) = expected, found
    what = ("truncated" if now_size < size else "grown" if now_size > size else "rewritten (same size, new mtime)")
    return CheckpointError(
        f"{path.name} changed {moment}: it was {what} after the plan read its header, so the plan no longer "
        f"describes it.", file=path, field="file size and mtime",
        expected=f"{size} bytes, mtime {mtime} ns (as planned)", found=f"{now_size} bytes, mtime {now_mtime} ns",
        fix="do not rewrite a checkpoint while it loads (a copy, download or save still running?); load again "
            "once it has finished")
