"""The native engine's instanttensor reader (engine option ``reader="instanttensor"``), and its
read-ahead.

instanttensor's C++ readers fill a ring buffer on the GPU (outside torch's allocator) from the
page cache; each tensor is cloned out of the ring into torch memory, which is then the tensor's
storage. Its readers need no Python, so they can run while Python does something else: when the
request names the model's CUDA device, the engine opens the reader before the plan
(:meth:`NativeEngine.read_ahead`), and the import of the model's code and the planning (0.2 s for
an 8B Llama on an H200) overlap the first gigabytes of reading, up to what the ring holds.
"""

from __future__ import annotations

import functools
import os
import time
import warnings
from typing import TYPE_CHECKING, Any, Iterator

from ..contract.engines import ReadAhead
from ..contract.errors import OptionError
from ..contract.units import format_size
from .page_cache import is_cold

if TYPE_CHECKING:  # the pread machinery is imported when a load streams, not to start a read-ahead
    from .reader import SafetensorsReader
    from .streaming import StreamItem

INSTANT_BUFFER = 1 << 30  # the ring of a load that did not read ahead
# Bytes per read: 4 MiB loaded an 8B checkpoint in 0.49 s against 0.61 s with instanttensor's own
# 8 MiB, and holds half the host memory in flight (H200, bench/results/h200_gpu_engines_2026-12-03_read_ahead.json).
INSTANT_CHUNK = 4 << 20
# The most a read-ahead ring holds by default: more than the page cache delivers (40 GB/s) while
# a model's code is imported and its load planned (0.25 s for an 8B Llama on an H200, with the
# readers running). An 8 GiB ring filled before that plan was made, and the readers waited: the load
# took 0.48 s (median of ten runs) against 0.43 s (seven runs) with the whole 15 GiB checkpoint
# in the ring (bench/results/h200_gpu_engines_2026-12-03*.json).
READ_AHEAD_MAX = 16 << 30
READ_AHEAD_MARGIN = 1 << 30  # device memory left over beside the model and the ring
# Direct reads (io=direct): instanttensor's own chunk for them, and at most this many in flight
# (each holds a pinned host buffer of the chunk's size: 128 MiB in all).
DIRECT_CHUNK = 8 << 20
DIRECT_DEPTH = 16
RING_GUARD = 64 << 20  # beyond the ring, for instanttensor's alignment guard and CUDA's own granularity


def instant_ring(inventory: Any) -> int:
    """The ring of a load that did not read ahead: :data:`INSTANT_BUFFER`, or the checkpoint's
    largest tensor where that is bigger (instanttensor enlarges the ring to it by itself, and the
    plan must count what it takes: a 128k-token vocabulary of width 8192 is 2 GiB in bf16)."""
    return max([INSTANT_BUFFER, *(info.nbytes for info in inventory.tensors.values())])


def read_ahead_ring(free: int, needed: int, checkpoint: int, asked: int | None, largest: int = 0) -> int:
    """Bytes of ring to read ahead into, or 0 for no read-ahead.

    :param free: the device's free memory now.
    :param needed: what the model will take there at most (its tensors in the load dtype).
    :param checkpoint: the checkpoint's bytes: a ring never needs to hold more (but it is never
        smaller than the 1 GiB ring a load uses anyway; instanttensor trims it to what it needs).
    :param asked: the user's ``read_ahead`` size, or ``None`` for the automatic one.
    :param largest: the checkpoint's largest tensor: no ring is smaller (instanttensor would
        enlarge it to that).

    The ring must fit beside the model with a margin, and within half the free memory, which is
    all instanttensor takes. The automatic ring is as big as fits there, up to
    :data:`READ_AHEAD_MAX` (and at least 1 GiB and the largest tensor, or none); an asked size
    is that size or none.
    """
    room = min(free // 2, free - needed - READ_AHEAD_MARGIN)
    smallest = max(INSTANT_BUFFER, largest)
    most = max(checkpoint, smallest)
    if asked is None:
        ring = min(max(min(READ_AHEAD_MAX, most), smallest), room)
        return ring if ring >= smallest else 0
    ring = max(min(asked, most), smallest)
    return ring if ring <= room else 0


def check_instant_ring(options: dict[str, Any], ring: int = INSTANT_BUFFER) -> str | None:
    """Why instanttensor would refuse ``readers`` reads of ``chunk_bytes`` in flight with a ring of
    ``ring`` bytes (it checks at the start of the stream; asked here, with its own arithmetic, so
    that the plan refuses them instead), or ``None`` when it takes them."""
    from instanttensor._impl import required_buffer_size_for_io

    depth, chunk = _depth_and_chunk(options)
    needed = required_buffer_size_for_io(chunk, depth, 1)
    if needed > ring:
        return (f"engine options readers={depth} and chunk_bytes={format_size(chunk)} need a "
                f"{format_size(needed)} ring buffer, and instanttensor's is {format_size(ring)}")
    return None


def _depth_and_chunk(options: dict[str, Any]) -> tuple[int, int]:
    """The reads in flight and bytes per read the options ask instanttensor for (defaults: one
    read; the chunk of the ``io`` mode)."""
    return options.get("readers", 1), options.get("chunk_bytes", DIRECT_CHUNK if options.get("io") == "direct"
                                                  else INSTANT_CHUNK)


def instanttensor_installed() -> bool:
    """Whether the optional instanttensor package can be imported (asked without importing it)."""
    import importlib.util

    return importlib.util.find_spec("instanttensor") is not None


def instant_io(asked: str, files: list[str]) -> str:
    """``io=auto`` settled: ``"direct"`` when ``files`` are cold (:func:`~.page_cache.is_cold`: a
    cold disk is read past the page cache at its full speed), else ``"buffered"``."""
    if asked != "auto":
        return asked
    return "direct" if is_cold(files) else "buffered"


def _open(files: list[str], device: str, ring: int, io_depth: int | None, chunk_bytes: int | None,
          names: list[str] | None = None, direct: bool = False) -> Any:
    """An instanttensor handle reading ``files`` (only the tensors ``names``, if given) onto
    ``device`` through the page cache, or past it (``direct``: O_DIRECT, or memory-mapped where the
    files are in memory, on tmpfs); it starts reading at once."""
    selection = {} if names is None else {"tensor_filter": names, "tensor_name_match_mode": "exact"}
    with warnings.catch_warnings():
        # instanttensor trims a ring bigger than the tensors it reads, and says so: the plan counted
        # the whole ring, an upper bound, and a user has nothing to act on
        warnings.filterwarnings("ignore", message="Shrink buffer size", category=RuntimeWarning)
        handle = _safe_open(files, device, ring, io_depth, chunk_bytes, selection, direct)
    return handle.__enter__()  # entered once (it opened already): closing it is then always its __exit__


def _safe_open(files: list[str], device: str, ring: int, io_depth: int | None, chunk_bytes: int | None,
               selection: dict[str, Any], direct: bool) -> Any:
    from instanttensor import safe_open as instanttensor_open
    from instanttensor._impl import Backend, BackendPolicy, required_buffer_size_for_io

    room_outside_torch(device, ring)
    # The plan counted the ring beside the model within the device's budget: instanttensor's own
    # rule, a ring within half the free memory, would refuse a plan that fits (a small model on a
    # nearly full GPU) with an error from inside it.
    safe_open = functools.partial(instanttensor_open, max_free_mem_usage=1.0)
    if direct:
        # named, so that INSTANTTENSOR_BACKEND cannot turn it into something else; a depth that fits
        # the ring, so that instanttensor need not shrink it (with a warning)
        chunk = chunk_bytes or DIRECT_CHUNK
        depth = io_depth or max(1, min(DIRECT_DEPTH, ring // required_buffer_size_for_io(chunk, 1, 1)))
        return safe_open(files, framework="pt", device=device, backend=[Backend.URING, Backend.AIO, Backend.MMAP],
                         buffer_size=ring, io_depth=depth, chunk_size=chunk, **selection)
    return safe_open(files, framework="pt", device=device, backend=BackendPolicy.BUFFERED, buffer_size=ring,
                     io_depth=io_depth, chunk_size=chunk_bytes or INSTANT_CHUNK, **selection)


def room_outside_torch(device: str, ring: int) -> None:
    """Empties torch's cache of unused blocks where CUDA alone has less free than the ring needs:
    the plan's budget counts that cache as free (:func:`~loadstone.contract.placement.cuda_free_bytes`),
    and instanttensor allocates its ring with CUDA directly, outside torch."""
    import torch

    if int(torch.cuda.mem_get_info(device)[0]) < ring + RING_GUARD:
        torch.cuda.empty_cache()


class InstantReadAhead(ReadAhead):
    """instanttensor reading every tensor of ``files`` onto ``device`` before the plan exists.

    Its readers start at once and stop when the ring is full, until the engine takes the handle
    (:meth:`take`) and empties the ring as it loads; :meth:`close` frees the ring otherwise."""

    def __init__(self, files: list[str], device: str, ring: int, *, io_depth: int | None = None,
                 chunk_bytes: int | None = None):
        self.files, self.device, self.ring = files, device, ring
        self.device_bytes = {device: ring}
        self.started = time.perf_counter()
        self._handle = _open(files, device, ring, io_depth, chunk_bytes)

    def take(self) -> Any:
        """The open instanttensor handle, now the caller's to close (``with handle: ...``)."""
        handle, self._handle = self._handle, None
        if handle is None:
            raise RuntimeError("this read-ahead was closed or taken already")
        return handle

    def close(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            import torch

            with torch.cuda.device(self.device):  # instanttensor synchronises the current device's stream
                handle.__exit__(None, None, None)


class InstantTensorStream:
    """The :class:`~loadstone.engines.streaming.TensorStream` interface over instanttensor: one CUDA
    device; tensors arrive in file order and are handed out in the consumer's.

    :param ahead: a read-ahead of these files to continue, instead of opening them afresh (its
        ring then replaces ``buffer_bytes``; tensors it reads that no item wants are dropped).
    :param direct: read past the page cache (engine option ``io=direct``); where instanttensor
        cannot (a file system without O_DIRECT), it reads through the page cache and says why in
        :attr:`fallback`.
    """

    accelerated = True
    chunk = 0

    def __init__(self, reader: SafetensorsReader, items: list[StreamItem], *, buffer_bytes: int = INSTANT_BUFFER,
                 io_depth: int | None = None, chunk_bytes: int | None = None, ahead: InstantReadAhead | None = None,
                 direct: bool = False):
        devices = {item.device for item in items}
        if len(devices) != 1 or not next(iter(devices), "cpu").startswith("cuda"):
            raise ValueError("the instanttensor reader loads onto one CUDA device")
        self.reader, self.items, self.buffer_bytes = reader, items, buffer_bytes
        # io_depth None: instanttensor's own choice of reads in flight (cores - 4, at most 28);
        # chunk_bytes None: INSTANT_CHUNK
        self.io_depth, self.chunk_bytes = io_depth, chunk_bytes
        self.gpus = sorted(devices)
        self.readers = "instanttensor"
        self.ahead = ahead
        self.direct, self.fallback = direct and ahead is None, None
        if ahead is not None and (ahead.device != self.gpus[0]
                                  or not {os.fspath(i.info.file) for i in items} <= set(ahead.files)):
            raise ValueError(f"the read-ahead reads {len(ahead.files)} files onto {ahead.device}, "
                             f"not what this stream loads")

    def __iter__(self) -> Iterator[tuple[StreamItem, Any]]:
        import torch

        for path in {item.info.file for item in self.items}:
            self.reader.open(path)  # refuses a file that changed since its header was read
        wanted = {item.info.name for item in self.items}
        if self.ahead is not None:
            handle = self.ahead.take()
        else:
            handle = self._open(sorted({os.fspath(item.info.file) for item in self.items}), sorted(wanted))
        stash: dict[str, Any] = {}
        with torch.cuda.device(self.gpus[0]), handle:
            arriving = handle.tensors()
            for item in self.items:
                while item.info.name not in stash:
                    name, tensor = next(arriving)
                    if name in wanted:  # a read-ahead reads every tensor of its files
                        stash[name] = tensor
                    tensor = None
                yield item, stash.pop(item.info.name)

    def _open(self, files: list[str], names: list[str]) -> Any:
        if self.direct:
            try:
                return _open(files, self.gpus[0], self.buffer_bytes, self.io_depth, self.chunk_bytes, names, direct=True)
            except Exception as exc:  # noqa: BLE001 (any refusal of O_DIRECT: the page cache still serves)
                self.fallback = f"{type(exc).__name__}: {str(exc)[:200]}"
        return _open(files, self.gpus[0], self.buffer_bytes, self.io_depth, self.chunk_bytes, names)

    def release(self, item: StreamItem) -> None:
        """Nothing to release: each tensor is torch memory of its own."""


def refuse_overflow(options: dict[str, Any], ring: int) -> None:
    """:func:`check_instant_ring`'s answer as the plan's :class:`~loadstone.OptionError`."""
    problem = check_instant_ring(options, ring)
    if problem:
        depth, chunk = _depth_and_chunk(options)
        raise OptionError(problem + ".", field="engine option readers", found=f"readers={depth}, chunk_bytes={chunk}",
                          expected=f"readers x chunk_bytes within {format_size(ring)}",
                          fix="pass fewer readers or a smaller chunk_bytes")


def start_read_ahead(inventory: Any, device: str, options: dict[str, Any], *, wider: int = 1,
                     budget: int | None = None) -> InstantReadAhead | None:
    """The native engine's read-ahead onto the CUDA ``device`` (``options`` normalised, reader
    ``auto`` or ``instanttensor``), or ``None`` where there is none: ``read_ahead=off``,
    instanttensor not installed, a ring that does not fit (:func:`read_ahead_ring`; ``wider``: how
    many times the checkpoint's bytes the model takes on the device; ``budget``: the user's
    ``max_memory`` for the device, which the plan will hold the ring to), or instanttensor failing
    to start (a file system it cannot read, the memory taken meanwhile)."""
    asked = options.get("read_ahead", "auto")
    if asked == 0 or not instanttensor_installed():
        return None
    from ..contract.placement import cuda_free_bytes

    free = cuda_free_bytes(device)
    free = free if budget is None else min(free, budget)
    stored = sum(info.nbytes for info in inventory.tensors.values())
    largest = max((info.nbytes for info in inventory.tensors.values()), default=0)
    ring = read_ahead_ring(free, stored * wider, stored, None if asked == "auto" else asked, largest)
    if not ring or ("readers" in options or "chunk_bytes" in options) and check_instant_ring(options, ring):
        return None
    try:
        return InstantReadAhead(checkpoint_files(inventory), device, ring, io_depth=options.get("readers"),
                                chunk_bytes=options.get("chunk_bytes"))
    except Exception:  # it is only ahead of time: the load reads after the plan instead
        return None


def checkpoint_files(inventory: Any) -> list[str]:
    """The checkpoint's weight files, in the order instanttensor is given them."""
    return sorted({os.fspath(info.file) for info in inventory.tensors.values()})
