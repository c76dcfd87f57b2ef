"""Reading one tensor's bytes from a safetensors file with ``pread`` into its final storage.

Not memory-mapped by default: a file truncated or replaced while a load reads it would kill the
process with SIGBUS through a mapping; ``pread`` returns short instead, which becomes a
:class:`~loadstone.CheckpointError` naming the file. Each file is checked against what the plan
read from its header (size and mtime) when it is opened.

:meth:`SafetensorsReader.map` is the exception, for tensors kept on the CPU as stored (the native
engine's ``reader=mmap``, and ``reader=auto`` where the page cache holds the checkpoint): a
copy-on-write view of the file's pages, no read and no copy, as ``from_pretrained`` does on the
CPU, under a read lease that keeps the view's bytes when the file is rewritten (:mod:`.leases`).
"""

from __future__ import annotations

import mmap
import os
import threading
from pathlib import Path
from typing import Any

from ..contract.checkpoint import CheckpointInventory, TensorInfo, changed_file_error
from ..contract.errors import CheckpointError
from ..safetensors_header import TORCH_DTYPE_NAMES
from . import leases


class SafetensorsReader:
    """Reads tensors of one checkpoint by name; thread-safe (``pread`` takes explicit offsets)."""

    def __init__(self, inventory: CheckpointInventory):
        self.inventory = inventory
        self._files: dict[Path, tuple[int, int]] = {}  # path -> (fd, data section start)
        self._maps: dict[Path, mmap.mmap | None] = {}
        #: per file :meth:`map` was asked about: ``"leased"``, ``"unprotected"`` (mapped with no
        #: lease) or ``"read"``, and why no lease could be had (``None`` where one was)
        self.mapped_files: dict[Path, tuple[str, str | None]] = {}
        self._lock = threading.Lock()
        self._parts: Any = None  # the pool that reads big tensors in parts, and the pid it was made in
        self._parts_pid = 0

    def __enter__(self) -> "SafetensorsReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            for fd, _ in self._files.values():
                os.close(fd)
            self._files.clear()
            for mapped in self._maps.values():
                if mapped is not None:
                    leases.noted_all(mapped)  # a lease break now copies only what the tensors use
            self._maps.clear()  # the tensors made by map() hold their mappings themselves
            pool, self._parts = self._parts, None
        if pool is not None and self._parts_pid == os.getpid():
            pool.shutdown()  # no thread of the load outlives it (a later fork() warns about threads)

    def open(self, path: Path) -> tuple[int, int]:
        """``(file descriptor, offset of the data section)`` of one weight file, opened once and
        checked against what its header was read with."""
        with self._lock:
            opened = self._files.get(path)
            if opened is not None:
                return opened
            try:
                fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            except OSError as exc:
                raise CheckpointError(f"{path.name} cannot be opened for reading: {exc.strerror or exc}.", file=path,
                                      field="file", expected="the file the plan read", found=type(exc).__name__,
                                      fix="check that the checkpoint was not moved or deleted during the load") from None
            try:
                header_len = int.from_bytes(os.pread(fd, 8, 0), "little")
                st = os.fstat(fd)
            except OSError as exc:
                os.close(fd)
                raise CheckpointError(f"{path.name} cannot be read: {exc.strerror or exc}.", file=path, field="file",
                                      fix="check the disk and that the file was not replaced") from None
            expected = self.inventory.file_stats.get(path)
            if expected is not None and (st.st_size, st.st_mtime_ns) != expected:
                os.close(fd)
                raise changed_file_error(path, expected, (st.st_size, st.st_mtime_ns), "before it was read")
            opened = (fd, 8 + header_len)
            self._files[path] = opened
            return opened

    def map(self, info: TensorInfo, *, unleased: str = "map", passing: bool = False) -> Any | None:
        """The tensor as stored, a copy-on-write view of its file's pages (``MAP_PRIVATE``): nothing
        is read until it is touched, and writes to it stay in this process. The file is mapped under
        a read lease where one can be had (:mod:`~loadstone.engines.leases`: a process that rewrites
        or truncates it waits while the used bytes are copied out); :attr:`mapped_files` says, per
        file, which it was and why.

        :param unleased: for a file no lease can be had on, ``"map"`` it unprotected or ``"read"``
            it (this returns ``None``).
        :param passing: the tensor only passes through (a weight the backend packs at once): a lease
            break after the load does not copy its bytes, and :meth:`give_back` returns its pages
            once it is packed (unless :meth:`keep` says the model holds it after all).
        :returns: ``None`` where the tensor is to be read instead: its bytes are not aligned for its
            dtype in the file, or its file is not mapped.
        """
        import torch

        torch_dtype = torch_dtype_of(info)
        mapped, data_start = self._mapping(info.file, unleased)
        offset = data_start + info.start
        if mapped is None or offset % torch_dtype.itemsize or not info.nbytes:
            return None
        if len(mapped) < data_start + info.end:
            raise CheckpointError(f"{info.file.name} is shorter than its header says: tensor {info.name!r} ends at "
                                  f"byte {data_start + info.end}.", file=info.file, field="file size",
                                  expected=f"at least {data_start + info.end} bytes", found=f"{len(mapped)} bytes",
                                  fix="re-download or re-save the checkpoint")
        if not passing:
            leases.note_use(mapped, offset, offset + info.nbytes)
        flat = torch.frombuffer(mapped, dtype=torch_dtype, count=info.nbytes // torch_dtype.itemsize, offset=offset)
        return flat.reshape(info.shape)

    def give_back(self, info: TensorInfo) -> bool:
        """The pages of a tensor mapped with ``passing=True`` that no other tensor shares, given
        back to the system now that it is packed (read from the file again if touched). Not where a
        lease break has copied the file out (its pages are then the only copy): ``False``."""
        mapped, start, end = self._mapped_bytes(info)
        if mapped is None:
            return False
        if self.mapped_files[info.file][0] == "leased":
            return leases.release_pages(mapped, start, end)
        leases.drop_pages(mapped, start, end)  # an unprotected map still maps the file
        return True

    def keep(self, info: TensorInfo) -> None:
        """A tensor mapped with ``passing=True`` is held by the model after all: a lease break
        copies its bytes out like any other tensor's."""
        mapped, start, end = self._mapped_bytes(info)
        if mapped is not None:
            leases.note_use(mapped, start, end)

    def _mapped_bytes(self, info: TensorInfo) -> tuple[mmap.mmap | None, int, int]:
        """The mapping :meth:`map` made of the tensor's file (``None``: none) and the tensor's byte
        range in it."""
        data_start = self.open(info.file)[1]
        with self._lock:
            mapped = self._maps.get(info.file)
        return mapped, data_start + info.start, data_start + info.end

    def _mapping(self, path: Path, unleased: str) -> tuple[mmap.mmap | None, int]:
        """The file's mapping (``None``: read it) and where its data section starts, made once."""
        fd, data_start = self.open(path)
        with self._lock:
            if path in self._maps:
                return self._maps[path], data_start
            mapped, refused = leases.lease_map(path, self.inventory.file_stats.get(path))
            if mapped is None and unleased == "map":
                try:
                    mapped = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)
                except (OSError, ValueError) as exc:
                    raise CheckpointError(f"{path.name} cannot be memory-mapped: {exc}.", file=path,
                                          field="engine option reader", found="mmap",
                                          fix="drop reader=mmap (the default reads the file instead)") from None
            self._maps[path] = mapped
            self.mapped_files[path] = ("leased" if refused is None else "unprotected" if mapped is not None
                                       else "read", refused)
            return mapped, data_start

    def read(self, info: TensorInfo, *, pinned: bool = False) -> Any:
        """The tensor as stored (its checkpoint dtype and shape), in new CPU memory.

        :param pinned: in page-locked memory from torch's caching host allocator (CUDA only), for a
            tensor about to be copied to a GPU: the copy is then a DMA, and once it is done the
            block is reused, already faulted in, by the next tensor of its size (plain memory
            where none can be had).
        """
        import torch

        fd, data_start = self.open(info.file)
        buffer = _pinned_bytes(info.nbytes) if pinned else None
        if buffer is None:
            buffer = torch.empty(info.nbytes, dtype=torch.uint8)
        if info.nbytes >= SPLIT_AT:
            self._read_in_parts(fd, data_start, info, memoryview(buffer.numpy()))
        elif info.nbytes:
            pread_exactly(fd, data_start, info, memoryview(buffer.numpy()), 0)
        return buffer.view(torch_dtype_of(info)).reshape(info.shape)

    def _read_in_parts(self, fd: int, data_start: int, info: TensorInfo, view: memoryview) -> None:
        """Fill ``view`` with the whole tensor, its parts of :data:`PART_BYTES` read in parallel by
        this reader's pool of :func:`default_readers` threads (the first error is raised once every
        part has ended)."""
        with self._lock:
            # a child made by fork() inherits the pool but none of its threads: it would wait forever
            if self._parts is None or self._parts_pid != os.getpid():
                from concurrent.futures import ThreadPoolExecutor

                self._parts = ThreadPoolExecutor(max_workers=default_readers(), thread_name_prefix="loadstone-read")
                self._parts_pid = os.getpid()
            pool = self._parts
        parts = [pool.submit(pread_exactly, fd, data_start, info, view[start:start + PART_BYTES], start)
                 for start in range(0, len(view), PART_BYTES)]
        for part in parts:
            part.exception()  # waits: no part may still write into the buffer when this returns
        for part in parts:
            part.result()


def default_readers() -> int:
    """Reader threads: 8 measured best on a 16-core H200 host (30.2 GB/s into the GPU; 12 and 16
    threads lost more to the GIL than they gained in reads), one per core, but at least 4: a read
    from a cold page cache waits on the disk, not the CPU, and on the 2-core CPU machine 4 readers
    streamed 1.5 GB from a dropped cache in 0.74-0.81 s against 1.32-1.43 s for 2, while a warm
    load lost 0.02-0.04 s to them (bench/results, docs/benchmarks.md)."""
    cores = os.cpu_count() or 2
    return max(4, min(8, cores))


# A tensor this big is read in parts of PART_BYTES by a pool of threads: one preadv copies from the
# page cache at about 5 GB/s, and from_pretrained reads a quantizing load's tensors one at a time
# (3.2 of its 4.6 s for an 8B NF4 load on an H200 went to that one thread's preadv).
SPLIT_AT = 64 << 20
PART_BYTES = 16 << 20


def _pinned_bytes(nbytes: int) -> Any | None:
    """``nbytes`` of page-locked memory, or ``None`` where the driver has none to give (the tensor is
    then read into plain memory: only its copy to the GPU is slower)."""
    import torch

    try:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    except RuntimeError:
        return None


def pread_exactly(fd: int, data_start: int, info: TensorInfo, view: memoryview, start: int) -> None:
    """Fill ``view`` with the tensor's bytes from byte ``start`` of the tensor on (``data_start``:
    where the file's data section begins); a CheckpointError naming the file where the read fails
    or the file ends early (truncated during the load)."""
    offset = data_start + info.start + start
    done, total = 0, len(view)
    while done < total:
        try:
            n = os.preadv(fd, [view[done:]], offset + done)
        except OSError as exc:
            raise CheckpointError(f"{info.file.name}: reading tensor {info.name!r} failed: {exc.strerror or exc}.",
                                  file=info.file, field=f"header[{info.name!r}]", found=type(exc).__name__,
                                  fix="check the disk; re-download the file if it is damaged") from None
        if n == 0:
            raise CheckpointError(
                f"{info.file.name} ended while tensor {info.name!r} was read: the file was truncated during "
                f"the load.", file=info.file, field="file size",
                expected=f"at least {data_start + info.end} bytes", found=f"{offset + done} bytes",
                fix="do not rewrite a checkpoint while it loads; re-download or re-save it")
        done += n


def torch_dtype_of(info: TensorInfo) -> Any:
    """The torch dtype a tensor is stored in; a CheckpointError naming it where this torch has none."""
    import torch

    name = TORCH_DTYPE_NAMES.get(info.dtype)
    if name is None or not hasattr(torch, name):
        raise CheckpointError(f"{info.file.name}: tensor {info.name!r} has dtype {info.dtype}, which this torch "
                              f"cannot hold.", file=info.file, field=f"header[{info.name!r}].dtype",
                              found=info.dtype, fix="upgrade torch, or convert the checkpoint")
    return getattr(torch, name)
