"""Streaming checkpoint tensors to their devices at the hardware's speed, with bounded host memory.

Reader threads take fixed-size chunks of the planned tensors, in file order, and read each with
``preadv`` (not memory-mapped: no page-fault storms, no SIGBUS on a truncated file):

* a chunk bound for the CPU is read straight into the tensor's final storage, or, where the
  tensor is cast on the CPU, into the thread's own buffer and cast from there into the final
  tensor (no full copy in the stored dtype);
* a chunk bound for an accelerator is read into one of the thread's pinned host buffers and
  copied from there on the thread's own CUDA stream, while the thread reads its next chunk into
  its other buffer; the tensor on the device is final storage too when no cast or conversion
  follows.

The consumer (the engine, on the caller's thread) receives tensors in plan order once every chunk
has arrived; on an accelerator its stream waits on the copy events, so nothing blocks the host.
Tensors that are only transient on their device (a full-precision copy a backend quantizes, a
copy in the stored dtype that is cast) draw from a per-device byte budget, released when the
consumer is done with them: the device never holds more of them than the plan's peak allows
(the largest group, plus the engine's ``in_flight`` allowance, which the plan counts).

Host memory is bounded by ``readers x 2 x chunk_bytes`` of pinned buffers, whatever the model size.
A tensor bound for the CPU that is only transient there (quantized or fused next) is read into an
anonymous mapping of its own (:func:`host_scratch`), which goes back to the system as soon as the
tensor dies, rather than into malloc's per-thread arenas, which would keep it.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Iterator

from ..contract.checkpoint import TensorInfo
from .reader import SafetensorsReader, default_readers, pread_exactly, torch_dtype_of

DEFAULT_CHUNK_BYTES = 8 << 20
# Bytes of transient tensors a device may hold beyond the largest group that is quantized or fused
# there. With none, readers of the next group wait for the consumer to finish the last one, and a
# quantized load streams at the pace of one group at a time.
IN_FLIGHT = 256 << 20


def in_flight_allowance(room: dict[str, int | None], asked: str | int) -> dict[str, int]:
    """Per device that holds transient tensors, the bytes of them allowed beyond its largest group.

    :param room: per such device, what the budget leaves beside the plan's peak (``None``: no
        budget known).
    :param asked: the ``in_flight`` option: ``"auto"`` takes :data:`IN_FLIGHT` where the room
        allows and less where it does not (never more than fits); a size is taken as asked, and
        the plan's fit check says where it does not fit.
    """
    if asked != "auto":
        return {device: int(asked) for device in room}
    return {device: IN_FLIGHT if free is None else max(0, min(IN_FLIGHT, free)) for device, free in room.items()}


@dataclass
class StreamItem:
    """One checkpoint tensor to read: where it goes, and whether it only passes through there."""

    info: TensorInfo
    device: str
    transient: bool = False
    cast_to: str | None = None  # a torch dtype name: a CPU tensor cast chunk by chunk while it is read
    ticket: int = 0  # this transient tensor's place in its device's budget queue
    # filled while streaming
    tensor: Any = field(default=None, repr=False)
    alloc: threading.Lock = field(default_factory=threading.Lock, repr=False)
    flat: Any = field(default=None, repr=False)  # the tensor's bytes, as one uint8 dimension
    view: Any = field(default=b"", repr=False)  # ... and as a memoryview (host tensors)
    fd: int | None = None
    base: int = 0  # where the file's data section starts
    remaining: int = 0
    events: list = field(default_factory=list, repr=False)
    ready: threading.Event = field(default_factory=threading.Event, repr=False)
    error: BaseException | None = None
    allocated: Any = field(default=None, repr=False)  # GPU: an event on the consumer's stream at allocation


def host_scratch(shape: tuple[int, ...], dtype: Any, nbytes: int) -> Any:
    """A CPU tensor in an anonymous mapping of its own, unmapped the moment the tensor dies.

    For tensors that only pass through the host (a copy a backend quantizes, MoE experts before
    they are fused): from malloc, each reader thread's arena would keep the freed blocks, and
    glibc's threshold for mapping big blocks rises with every one freed, so the process's RSS grows
    by many such copies (an NF4 load of 1.5 GB onto the CPU peaked at 1.65 GiB that way, at
    1.18-1.21 GiB this way)."""
    import mmap

    import torch

    tensor = torch.frombuffer(mmap.mmap(-1, nbytes), dtype=dtype, count=nbytes // dtype.itemsize)
    return tensor.reshape(shape)


SCRATCH_MIN_BYTES = 1 << 20  # smaller blocks come from malloc's heap, and go back to it


def _streams_to(device: str) -> bool:
    """Devices reached through pinned buffers and CUDA streams (others: read on the host, then moved)."""
    return device.startswith("cuda")


class _Budget:
    """Bytes of transient tensors allowed on one device at a time, granted in consumption order.

    In order, because readers race: were a later tensor to take the last bytes first, the consumer
    would wait for an earlier one that can never be allocated, and nothing would be released."""

    def __init__(self, limit: int):
        self.limit, self.used, self.turn = limit, 0, 0
        self.cond = threading.Condition()

    def take(self, n: int, ticket: int, stop: threading.Event) -> None:
        with self.cond:
            while not stop.is_set() and (ticket != self.turn or (self.used and self.used + n > self.limit)):
                self.cond.wait(0.05)
            self.used += n
            self.turn += 1
            self.cond.notify_all()

    def give(self, n: int) -> None:
        with self.cond:
            self.used -= n
            self.cond.notify_all()


class TensorStream:
    """Iterate planned tensors as they arrive on their devices (see the module docstring).

    :param items: tensors in the order the consumer wants them.
    :param readers: reader threads (default: :func:`default_readers`).
    :param chunk_bytes: bytes per read; each reader holds two pinned buffers of this size.
    :param transient_limit: per device, bytes of transient tensors allowed at once (at least the
        largest transient tensor on that device).
    """

    def __init__(self, reader: SafetensorsReader, items: list[StreamItem], *, readers: int | None = None,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES, transient_limit: dict[str, int] | None = None):
        self.reader, self.items = reader, items
        self.gpus = sorted({i.device for i in items if _streams_to(i.device)})  # what the copies go to
        self.accelerated = bool(self.gpus)
        # The consumer's stream per GPU, where every tensor is allocated (see _destination).
        self.home = {}
        if self.gpus:
            import torch

            self.home = {device: torch.cuda.current_stream(device) for device in self.gpus}
        self.readers = max(1, readers or default_readers())
        # whole pages, hence whole elements: a chunk cast on the CPU starts and ends on an element
        self.chunk = max(1 << 20, int(chunk_bytes)) // 4096 * 4096
        largest: dict[str, int] = {}
        for item in items:
            if item.transient:
                largest[item.device] = max(largest.get(item.device, 0), item.info.nbytes)
        limits = dict(transient_limit or {})
        self.budgets = {dev: _Budget(max(limits.get(dev, 0), n)) for dev, n in largest.items()}
        tickets: dict[str, int] = {}
        for item in items:
            if item.transient:
                item.ticket = tickets.get(item.device, 0)
                tickets[item.device] = item.ticket + 1
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.threads: list[threading.Thread] = []

    # ------------------------------------------------------------------ producer side

    def _chunks(self) -> None:
        for index, item in enumerate(self.items):
            n = item.info.nbytes
            item.remaining = max(1, -(-n // self.chunk))
            for start in range(0, max(n, 1), self.chunk):
                self.jobs.put((index, start, min(self.chunk, n - start)))
        for _ in range(self.readers):
            self.jobs.put(None)

    def _destination(self, item: StreamItem) -> Any:
        """The tensor the item is read into, allocated by the first reader that needs it. Only
        readers of this item wait here (for the transient budget), never the ones finishing
        earlier items: the consumer releases budget only once those arrive."""
        import torch

        with item.alloc:
            if item.error is not None:
                # this item's allocation failed for an earlier chunk (its budget is taken): taking it
                # again would wait for a turn that has passed, and the load would hang
                raise item.error
            if item.tensor is None:
                try:
                    if item.transient and item.device in self.budgets:
                        self.budgets[item.device].take(item.info.nbytes, item.ticket, self.stop)
                    stored = torch_dtype_of(item.info)
                    where = item.device if _streams_to(item.device) else "cpu"  # other accelerators: staged on the host
                    if item.cast_to is not None:
                        tensor = torch.empty(item.info.shape, dtype=getattr(torch, item.cast_to))
                        item.flat, item.tensor = tensor.view(-1), tensor
                        return tensor
                    if where == "cpu" and item.transient and item.info.nbytes >= SCRATCH_MIN_BYTES:
                        tensor = host_scratch(item.info.shape, stored, item.info.nbytes)
                    elif where == "cpu":
                        tensor = torch.empty(item.info.shape, dtype=stored, device="cpu")
                    else:
                        # On the consumer's stream, not this reader's: torch caches freed memory per
                        # stream, and transient tensors freed by the consumer but allocated on eight
                        # reader streams left 1.4 GiB of an NF4 load's device memory cached and unused
                        # (H200, 8B). The copies into it wait for the consumer's stream as it was now:
                        # kernels still reading what this memory held before must finish first.
                        home = self.home[where]
                        with torch.cuda.stream(home):
                            tensor = torch.empty(item.info.shape, dtype=stored, device=where)
                        item.allocated = torch.cuda.Event()
                        item.allocated.record(home)
                    item.flat = tensor.view(-1).view(torch.uint8) if tensor.numel() else tensor.view(torch.uint8)
                    if where == "cpu" and tensor.numel():
                        item.view = memoryview(item.flat.numpy())
                    item.tensor = tensor
                except BaseException as exc:
                    item.error = item.error or exc
                    raise
            return item.tensor

    def _work(self, accelerated: bool) -> None:
        """One reader thread. Per chunk it does a handful of Python operations around one
        ``preadv`` (which releases the GIL) and, for a GPU, one asynchronous copy: everything that
        can be prepared once (buffer views, streams, events) is."""
        import torch

        # Each reader pins its own two buffers: cudaHostAlloc costs ~0.5 ms per MiB, and the first
        # reader starts as soon as its own are ready rather than after everyone's.
        slots = [torch.empty(self.chunk, dtype=torch.uint8, pin_memory=True) for _ in range(2)] if accelerated else []
        views = [memoryview(slot.numpy()) for slot in slots]
        pending: list[Any] = [None, None]  # the event of each buffer's last copy
        cast_buffer: Any = None  # chunks of tensors cast on the CPU as they are read
        cast_view: memoryview = memoryview(b"")
        copy_streams: dict[str, tuple[Any, list[Any]]] = {}  # per device: this thread's stream, an event per buffer
        turn = 0
        while not self.stop.is_set():
            job = self.jobs.get()
            if job is None:
                break
            index, start, length = job
            item = self.items[index]
            event = None
            try:
                if item.error is not None:
                    raise item.error
                if item.cast_to is not None:  # read into this thread's buffer, cast into the tensor
                    if cast_buffer is None or len(cast_buffer) < length:
                        cast_buffer = torch.empty(self.chunk, dtype=torch.uint8)
                        cast_view = memoryview(cast_buffer.numpy())
                    self._pread(item, cast_view[:length], start)
                    self._destination(item)
                    stored = torch_dtype_of(item.info)
                    first = start // stored.itemsize
                    item.flat[first:first + length // stored.itemsize].copy_(cast_buffer[:length].view(stored))
                elif not _streams_to(item.device):
                    self._destination(item)
                    self._pread(item, item.view[start:start + length], start)
                else:
                    if pending[turn] is not None:
                        pending[turn].synchronize()
                    # Read first, allocate second: while a transient tensor waits for the device's
                    # budget, its bytes are already in host memory.
                    self._pread(item, views[turn][:length], start)
                    self._destination(item)
                    per_device = copy_streams.get(item.device)
                    if per_device is None:
                        # This thread's stream becomes its current one on that device, where copy_
                        # enqueues (it runs on the destination's device); events are recorded on it
                        # by name, since "the current stream" means the current device's, and the
                        # current device is whichever GPU this thread set last (maps span several).
                        stream = torch.cuda.Stream(device=item.device)
                        torch.cuda.set_stream(stream)
                        per_device = copy_streams[item.device] = (stream, [torch.cuda.Event(), torch.cuda.Event()])
                    if item.allocated is not None:
                        per_device[0].wait_event(item.allocated)
                    source = slots[turn] if length == self.chunk else slots[turn][:length]
                    item.flat[start:start + length].copy_(source, non_blocking=True)
                    stream, device_events = per_device
                    event = device_events[turn]
                    event.record(stream)
                    pending[turn], turn = event, 1 - turn
            except BaseException as exc:  # handed to the consumer, who raises it in its own thread
                item.error = item.error or exc
                event = None
            with self.lock:
                if event is not None:
                    item.events.append(event)
                item.remaining -= 1
                if item.remaining == 0:
                    item.ready.set()
        for event in pending:
            if event is not None:
                event.synchronize()

    def _pread(self, item: StreamItem, view: memoryview, start: int) -> None:
        if not len(view):
            return
        if item.fd is None:
            item.fd, item.base = self.reader.open(item.info.file)
        pread_exactly(item.fd, item.base, item.info, view, start)

    def _start(self) -> None:
        for i in range(self.readers):
            thread = threading.Thread(target=self._work, args=(self.accelerated,),
                                      name=f"loadstone-reader-{i}", daemon=True)
            self.threads.append(thread)
        feeder = threading.Thread(target=self._chunks, name="loadstone-chunks", daemon=True)
        feeder.start()
        for thread in self.threads:
            thread.start()
        self.threads.append(feeder)

    # ------------------------------------------------------------------ consumer side

    def __iter__(self) -> Iterator[tuple[StreamItem, Any]]:
        import torch

        self._start()
        try:
            for item in self.items:
                while not item.ready.wait(0.1):
                    if not any(t.is_alive() for t in self.threads):
                        raise RuntimeError("loadstone reader threads stopped before every tensor was read")
                if item.error is not None:
                    raise item.error
                if item.events:
                    current = self.home[item.device]
                    for event in item.events:
                        current.wait_event(event)
                tensor, item.tensor, item.events, item.flat, item.view = item.tensor, None, [], None, b""
                if tensor.device.type == "cpu" and item.device != "cpu":  # staged: mps, xpu ...
                    tensor = tensor.to(item.device)
                yield item, tensor
                # Not held while the next tensor is awaited: readers allocate that one as soon as
                # the consumer gives this one's budget back, and this frame would keep both alive
                # (a tiny NF4 load's peak was 1.1 MiB over the plan's on an H200 until this line).
                tensor = None
        finally:
            self.close()

    def release(self, item: StreamItem) -> None:
        """The consumer is done with a transient tensor: its bytes may be used by the next one."""
        if item.transient and item.device in self.budgets:
            self.budgets[item.device].give(item.info.nbytes)

    def close(self) -> None:
        self.stop.set()
        for _ in range(self.readers):
            self.jobs.put(None)
        for thread in self.threads:
            thread.join()
        for item in self.items:
            item.tensor = item.flat = item.allocated = None
            item.view = b""
