"""A transport the native engine does not use, measured: the GPU's copy engine reading the page
cache's own pages (the checkpoint memory-mapped, each chunk registered read-only with
``cudaHostRegister`` and copied with ``cudaMemcpyAsync``), against threads ``preadv``-ing into
pinned buffers (one CPU copy, then the DMA). Warm page cache; the 8B checkpoint of gpu_bnb.py.

    python3 bench/gpu_engines.py OUTDIR --rows instanttensor_buffered   # builds the checkpoint
    python3 bench/gpu_page_cache_dma.py /tmp/llama8b-shape              # writes $OUT or /tmp
    python3 bench/gpu_page_cache_dma.py /tmp/llama8b-shape ceiling      # the link alone, the reads alone

Each configuration fills one preallocated GPU buffer with every byte of every shard; 8 random
4 KiB spans are compared with the files afterwards (``ok``). ``register_s`` sums the threads'
time in madvise + cudaHostRegister. Result: 2026-12-03, bench/results/h200_page_cache_dma_2026-12-03.json
(docs/benchmarks.md).
"""

import ctypes
import glob
import json
import os
import random
import sys
import threading
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from measure import warm_page_cache  # noqa: E402

PROT_READ, MAP_SHARED = 1, 1
MADV_POPULATE_READ = 22  # Linux 5.14: fault the range in, in one call
CUDA_HOST_REGISTER_READ_ONLY = 8  # the mapping is read-only: the driver must not ask for write access

folder = sys.argv[1]
files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
sizes = [os.path.getsize(f) for f in files]
total = sum(sizes)
device = torch.device("cuda:0")
target = torch.empty(total, dtype=torch.uint8, device=device)
cudart = torch.cuda.cudart()
libc = ctypes.CDLL("libc.so.6", use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def chunks(size: int) -> list[tuple[int, int, int, int]]:
    """(file index, offset in the file, bytes, offset in the target) of every chunk."""
    out, base = [], 0
    for index, length in enumerate(sizes):
        out.extend((index, offset, min(size, length - offset), base + offset) for offset in range(0, length, size))
        base += length
    return out


def in_threads(threads: int, work: list, job) -> float:
    """Wall time of ``threads`` threads taking ``work`` items in turn, each calling ``job(stream, item)``
    (``job(stream, None)`` once at the end, to drain)."""
    lock, items = threading.Lock(), iter(work)

    def worker() -> None:
        stream = torch.cuda.Stream(device)
        with torch.cuda.stream(stream):
            while True:
                with lock:
                    item = next(items, None)
                job(stream, item)
                if item is None:
                    return

    start = time.perf_counter()
    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def registered(size: int, threads: int, populate: bool, whole_map: bool) -> dict:
    """DMA from the page cache: each chunk mapped (or the whole file once), registered, copied,
    and unregistered once its copy is done (two chunks in flight per thread)."""
    fds = [os.open(f, os.O_RDONLY) for f in files]
    maps = [libc.mmap(None, n, PROT_READ, MAP_SHARED, fd, 0) for fd, n in zip(fds, sizes)] if whole_map else None
    register_s, errors, local = [0.0], [], threading.local()

    def done(event, pointer, length) -> None:
        event.synchronize()
        cudart.cudaHostUnregister(pointer)
        if not whole_map:
            libc.munmap(pointer, length)

    def job(stream, item) -> None:
        pending = local.__dict__.setdefault("pending", [])
        if item is None or errors:
            while pending:
                done(*pending.pop(0))
            return
        index, offset, length, at = item
        pointer = maps[index] + offset if whole_map else libc.mmap(None, length, PROT_READ, MAP_SHARED, fds[index], offset)
        start = time.perf_counter()
        if populate:
            libc.madvise(pointer, length, MADV_POPULATE_READ)
        error = int(cudart.cudaHostRegister(pointer, length, CUDA_HOST_REGISTER_READ_ONLY))
        register_s[0] += time.perf_counter() - start
        if error:
            errors.append(error)
            return
        host = torch.frombuffer((ctypes.c_uint8 * length).from_address(pointer), dtype=torch.uint8)
        target[at:at + length].copy_(host, non_blocking=True)
        event = torch.cuda.Event()
        event.record(stream)
        pending.append((event, pointer, length))
        while len(pending) > 2:
            done(*pending.pop(0))

    wall = in_threads(threads, chunks(size), job)
    for pointer, length in zip(maps or [], sizes):
        libc.munmap(pointer, length)
    for fd in fds:
        os.close(fd)
    return {"kind": "register", "whole_map": whole_map, "populate": populate, "register_s": register_s[0],
            "errors": errors[:3], "wall": wall}


def preadv_pinned(size: int, threads: int, read: bool = True) -> dict:
    """The copy the native engine's pread reader makes: preadv into one of two pinned buffers per
    thread, then an async copy from it to the GPU. ``read=False`` is the link's own ceiling: the
    same copies with no read (the buffers hold whatever they held)."""
    fds = [os.open(f, os.O_RDONLY) for f in files] if read else []
    local = threading.local()

    def job(stream, item) -> None:
        if not hasattr(local, "buffers"):
            local.buffers = [torch.empty(size, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
            local.events, local.turn = [None, None], 0
        if item is None:
            stream.synchronize()
            return
        index, offset, length, at = item
        turn = local.turn
        if local.events[turn] is not None:
            local.events[turn].synchronize()
        if read:
            os.preadv(fds[index], [memoryview(local.buffers[turn].numpy())[:length]], offset)
        target[at:at + length].copy_(local.buffers[turn][:length], non_blocking=True)
        local.events[turn] = torch.cuda.Event()
        local.events[turn].record(stream)
        local.turn ^= 1

    wall = in_threads(threads, chunks(size), job)
    for fd in fds:
        os.close(fd)
    return {"kind": "pread" if read else "link only", "wall": wall}


def read_only(size: int, threads: int) -> dict:
    """The page cache's own ceiling: preadv of every chunk into a pinned buffer, no copy to the GPU."""
    fds = [os.open(f, os.O_RDONLY) for f in files]
    local = threading.local()

    def job(stream, item) -> None:
        if not hasattr(local, "buffer"):
            local.buffer = torch.empty(size, dtype=torch.uint8, pin_memory=True)
        if item is not None:
            index, offset, length, _ = item
            os.preadv(fds[index], [memoryview(local.buffer.numpy())[:length]], offset)

    wall = in_threads(threads, chunks(size), job)
    for fd in fds:
        os.close(fd)
    return {"kind": "read only", "wall": wall}


def matches_files() -> bool:
    for _ in range(8):
        index = random.randrange(len(files))
        offset = random.randrange(sizes[index] - 4096)
        with open(files[index], "rb") as fh:
            fh.seek(offset)
            expected = fh.read(4096)
        at = sum(sizes[:index]) + offset
        if bytes(target[at:at + 4096].cpu().numpy()) != expected:
            return False
    return True


def main() -> None:
    warm_page_cache(files)
    print("checkpoint GB", total / 1e9, "kernel", os.uname().release, flush=True)
    configurations = [(preadv_pinned, dict(threads=16, size=8 << 20)), (preadv_pinned, dict(threads=16, size=4 << 20))]
    if sys.argv[2:] == ["ceiling"]:  # what bounds the page cache -> GPU stream: the link, or the reads
        configurations = [(preadv_pinned, dict(threads=t, size=c, read=False))
                          for t, c in [(1, 64 << 20), (2, 64 << 20), (4, 8 << 20), (8, 8 << 20)]]
        configurations += [(read_only, dict(threads=t, size=8 << 20)) for t in (4, 8, 12, 16)]
        configurations += [(preadv_pinned, dict(threads=t, size=8 << 20)) for t in (12, 16)]
    for whole_map in (False, True) if len(configurations) == 2 else ():
        for populate in (False, True):
            for threads, size in [(8, 64 << 20), (16, 64 << 20), (16, 16 << 20), (8, 256 << 20), (4, 256 << 20)]:
                configurations.append((registered, dict(threads=threads, size=size, populate=populate,
                                                        whole_map=whole_map)))
    results = []
    for run, config in configurations:
        target.zero_()
        record = {**run(**config), "threads": config["threads"], "chunk": config["size"]}
        record.update(gbs=total / record["wall"] / 1e9,
                      ok=None if not config.get("read", True) or run is read_only
                      else not record.get("errors") and matches_files())
        print(record, flush=True)
        results.append(record)
    name = "link_ceiling.json" if sys.argv[2:] == ["ceiling"] else "page_cache_dma.json"
    with open(os.path.join(os.environ.get("OUT", "/tmp"), name), "w") as fh:
        json.dump({"checkpoint_bytes": total, "torch": torch.__version__, "kernel": os.uname().release,
                   "gpu": torch.cuda.get_device_name(0), "rows": results}, fh, indent=1)


if __name__ == "__main__":
    main()
