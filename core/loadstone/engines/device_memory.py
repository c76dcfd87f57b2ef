"""One cudaMalloc for the tensors a load keeps on a GPU, instead of one per tensor.

torch's caching allocator takes each tensor bigger than 1 MiB from its large pool; in a process
that has not used the device yet, each is a cudaMalloc of its own, on the load's critical path
when the readers are ahead of the engine. Allocated as one block and freed at once, the bytes
stay in torch's cache, and each tensor's allocation splits that block instead. An 8B bf16 load
on an H200 took 0.384 s with it and 0.409 s without (medians of five interleaved rounds,
bench/results/h200_gpu_engines_2026-12-04_reserve_ablation.json), and 0.12 GiB less device
memory at its peak (no segment per tensor rounded up to 2 MiB).

Nothing is held beyond what the plan counted: the block is the kept tensors' bytes, which the
load allocates anyway, and it is torch's to hand out again (transformers' ``get_max_memory`` and
loadstone's plan count cached memory as free).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable

if TYPE_CHECKING:
    from .streaming import StreamItem

# torch's large pool: tensors above 1 MiB, rounded up to 512 bytes. Smaller ones come from 2 MiB
# segments of the small pool, which a large block does not serve.
LARGE_POOL_ABOVE = 1 << 20
ALLOCATION_ROUNDING = 512


def kept_bytes(sizes: Iterable[int]) -> int:
    """What torch's large pool hands out for tensors of ``sizes`` bytes, as it rounds them."""
    return sum(-(-n // ALLOCATION_ROUNDING) * ALLOCATION_ROUNDING for n in sizes if n > LARGE_POOL_ABOVE)


def reserve_in_torch_cache(device: str, nbytes: int) -> bool:
    """Allocates ``nbytes`` on the CUDA ``device`` as one block and frees it into torch's cache, on
    the current stream (which caches its own blocks: the load allocates on it too). ``False`` where
    nothing was reserved: too little to matter, an allocator that does not cache this way
    (``cudaMallocAsync``) or would not split a block this big (``max_split_size_mb`` in
    ``PYTORCH_CUDA_ALLOC_CONF``: the block would sit in the cache beside the tensors), or no room
    for one block (the tensors then allocate one by one)."""
    import torch

    if nbytes <= LARGE_POOL_ABOVE or torch.cuda.get_allocator_backend() != "native":
        return False
    unsplit = int(torch.cuda.memory_stats(device).get("max_split_size", -1))  # -1: every block splits
    if 0 < unsplit <= nbytes:
        return False
    try:
        with torch.cuda.device(device):
            block: Any = torch.empty(nbytes, dtype=torch.uint8, device=device)
    except torch.cuda.OutOfMemoryError:
        return False
    del block
    return True


def reserve_kept(items: list[StreamItem]) -> None:
    """The tensors each GPU keeps as they arrive (``items`` not transient there), reserved in
    torch's cache as one block per GPU."""
    kept: dict[str, list[int]] = {}
    for item in items:
        if not item.transient and item.device.startswith("cuda"):
            kept.setdefault(item.device, []).append(item.info.nbytes)
    for device, sizes in kept.items():
        reserve_in_torch_cache(device, kept_bytes(sizes))
