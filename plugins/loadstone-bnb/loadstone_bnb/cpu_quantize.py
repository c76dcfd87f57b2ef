"""4-bit quantization on the CPU in cache-sized chunks, equal bit for bit to bitsandbytes' own.

bitsandbytes (0.46-0.50) has no CPU kernel for ``quantize_4bit``: its default op scales the whole
weight in float32 and finds each value's code with ``torch.bucketize``, several full-size passes
over memory plus a binary search per value (about 20 ns per value on the project's 2-core machine;
most of a CPU NF4 load). The code book has 16 entries, so a value's code is the number of the 15
midpoints between codes that lie below it, which 15 element-wise comparisons count; done 256 Ki
values at a time, everything stays in the CPU's cache. That is 2.5-4x faster and needs a few
megabytes of work memory instead of about ten bytes per value.

Equality is not assumed, it is checked: before its first use in a process (per quant type, block
size, storage and input dtype) the chunked kernel quantizes a probe of awkward values (zero,
negative zero, subnormal, infinite and NaN blocks, values exactly on the midpoints, chunk edges)
and is compared with bitsandbytes' op; where any byte differs (a later bitsandbytes that changes
its rounding), bitsandbytes' op runs instead and the load's report says so.

Only the integer codes and block scales come from here: :func:`chunked_quantize_4bit` stands in
for the one op call ``bitsandbytes.functional.quantize_4bit`` makes (:class:`ChunkedOnCpu`), which
then builds the quantization state (double quantization included) itself, as always.
"""

from __future__ import annotations

import functools
import threading
from typing import Any

from torch.overrides import TorchFunctionMode

CHUNK = 1 << 18  # values per step: 1 MiB of float32 work, within a core's L2 cache
CHUNKED, BITSANDBYTES = "chunked", "bitsandbytes"
QUANTIZERS = (CHUNKED, BITSANDBYTES)


@functools.lru_cache(maxsize=None)
def code_midpoints(quant_type: str) -> tuple[tuple[float, ...], Any]:
    """The midpoints between consecutive codes of the sorted 4-bit code book (as exact float32
    values), and the code index of each sorted position (FP4's book is not sorted)."""
    import torch
    from bitsandbytes.functional import get_4bit_type

    code = get_4bit_type(quant_type, device="cpu").float()
    order = torch.argsort(code)
    ordered = code[order]
    return tuple(((ordered[:-1] + ordered[1:]) / 2).tolist()), order.to(torch.uint8)


def eligible(tensor: Any, blocksize: int) -> bool:
    """Whether the chunked kernel takes ``tensor``: a contiguous float16/bfloat16/float32 CPU
    tensor of whole blocks (bitsandbytes treats a trailing partial block differently)."""
    import torch

    return (tensor.device.type == "cpu" and tensor.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and tensor.is_contiguous() and tensor.numel() > 0 and tensor.numel() % blocksize == 0)


def chunked_quantize_4bit(tensor: Any, blocksize: int, quant_type: str, quant_storage: Any,
                          chunk: int = CHUNK) -> tuple[Any, Any]:
    """What ``torch.ops.bitsandbytes.quantize_4bit`` returns for an :func:`eligible` tensor: the
    codes packed two per byte (first value in the high nibble), shaped ``(n / 2, 1)`` and viewed as
    ``quant_storage``, and the float32 absolute maximum of each block of ``blocksize`` values."""
    import torch

    midpoints, order = code_midpoints(quant_type)
    flat = tensor.reshape(-1)
    n = flat.numel()
    step = max(blocksize, chunk // blocksize * blocksize)
    absmax = torch.empty(n // blocksize, dtype=torch.float32)
    packed = torch.empty(n // 2, dtype=torch.uint8)
    work = torch.empty(min(step, n), dtype=torch.float32)
    at_most = torch.empty(min(step, n), dtype=torch.uint8)
    below = torch.empty(min(step, n), dtype=torch.bool)
    for start in range(0, n, step):
        stop = min(n, start + step)
        values, count, hit = work[:stop - start], at_most[:stop - start], below[:stop - start]
        values.copy_(flat[start:stop])
        blocks = values.view(-1, blocksize)
        scales = absmax[start // blocksize:stop // blocksize]
        scales.copy_(blocks.abs().max(dim=-1)[0])
        blocks.mul_((1.0 / scales.clamp(min=1e-38)).view(-1, 1)).clamp_(-1, 1)
        # Count the midpoints a value does not exceed: NaN exceeds none of them and gets the top
        # code, as bucketize gives it.
        torch.le(values, midpoints[0], out=hit)
        count.copy_(hit.view(torch.uint8))
        for midpoint in midpoints[1:]:
            torch.le(values, midpoint, out=hit)
            count.add_(hit.view(torch.uint8))
        codes = torch.sub(len(midpoints), count)
        if quant_type != "nf4":
            codes = order[codes.long()]
        torch.bitwise_or(codes[::2] << 4, codes[1::2], out=packed[start // 2:stop // 2])
    result = packed.unsqueeze(1)
    if quant_storage != torch.uint8:
        result = packed.view(quant_storage).unsqueeze(1)
    return result, absmax


def probe(dtype: Any, blocksize: int, quant_type: str) -> Any:
    """Values that tell a kernel differing from bitsandbytes' apart: ordinary weights at several
    scales, blocks of zeros, negative zeros, subnormals, infinities and NaN, and blocks whose
    scaled values fall exactly on the code midpoints; 37 blocks, so that a small chunk ends
    mid-tensor and a last chunk is short."""
    import torch

    generator = torch.Generator().manual_seed(0)
    blocks = [torch.randn(blocksize, generator=generator) * scale for scale in (1e-3, 0.02, 1.0, 300.0)]
    midpoints = torch.tensor(code_midpoints(quant_type)[0])
    edges = torch.cat([midpoints, -midpoints, torch.tensor([1.0, -1.0, 0.0])])
    blocks.append(edges.repeat(blocksize // len(edges) + 1)[:blocksize])
    blocks += [torch.zeros(blocksize), torch.full((blocksize,), -0.0), torch.full((blocksize,), 1e-40)]
    special = torch.randn(blocksize, generator=generator)
    special[::7], special[3::11] = float("inf"), float("-inf")
    blocks.append(special)
    nan = torch.randn(blocksize, generator=generator)
    nan[5] = float("nan")
    blocks.append(nan)
    blocks += [torch.randn(blocksize, generator=generator) * 0.05 for _ in range(37 - len(blocks))]
    return torch.cat(blocks).to(dtype).reshape(37, blocksize)


_checked: dict[tuple[str, int, str, str], str | None] = {}
_checked_lock = threading.Lock()


def disagreement(dtype: Any, blocksize: int, quant_type: str, quant_storage: Any) -> str | None:
    """Why the chunked kernel may not stand in for bitsandbytes' op for these arguments (its
    result on the :func:`probe` differs, or it fails), or ``None`` where they agree. Asked once
    per process and argument set."""
    key = (str(dtype), blocksize, quant_type, str(quant_storage))
    with _checked_lock:
        if key not in _checked:
            _checked[key] = _compare(dtype, blocksize, quant_type, quant_storage)
        return _checked[key]


def _compare(dtype: Any, blocksize: int, quant_type: str, quant_storage: Any) -> str | None:
    import torch

    values = probe(dtype, blocksize, quant_type)
    try:
        theirs = torch.ops.bitsandbytes.quantize_4bit.default(values, blocksize, quant_type, quant_storage)
        for chunk in (CHUNK, 4 * blocksize):
            ours = chunked_quantize_4bit(values, blocksize, quant_type, quant_storage, chunk=chunk)
            for name, a, b in (("packed codes", ours[0], theirs[0]), ("block scales", ours[1], theirs[1])):
                if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a.view(torch.uint8), b.view(torch.uint8)):
                    return f"its {name} differ from bitsandbytes' quantize_4bit on a probe ({dtype}, {quant_type})"
    except Exception as exc:  # noqa: BLE001 (any failure means: use bitsandbytes' own op)
        return f"{type(exc).__name__}: {exc}"
    return None


class ChunkedOnCpu(TorchFunctionMode):
    """While active (``with ChunkedOnCpu():``, this thread only), bitsandbytes' ``quantize_4bit``
    op on an :func:`eligible` CPU tensor runs :func:`chunked_quantize_4bit` where :func:`disagreement`
    finds none; any other call runs unchanged. :attr:`chunked` and :attr:`fallbacks` count the
    weights each way went, with the reason for the first fallback in :attr:`why`."""

    def __init__(self) -> None:
        super().__init__()
        self.chunked = self.fallbacks = 0
        self.why: str | None = None

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        import torch

        kwargs = kwargs or {}
        if func is not torch.ops.bitsandbytes.quantize_4bit.default:
            return func(*args, **kwargs)
        named = dict(zip(("A", "blocksize", "quant_type", "quant_storage"), args), **kwargs)
        tensor, blocksize, quant_type, quant_storage = (named["A"], named["blocksize"], named["quant_type"],
                                                        named["quant_storage"])
        if not eligible(tensor, blocksize):
            why = f"a {tuple(tensor.shape)} {tensor.dtype} weight is not whole blocks of {blocksize}"
        else:
            why = disagreement(tensor.dtype, blocksize, quant_type, quant_storage)
            if why is None:
                self.chunked += 1
                return chunked_quantize_4bit(tensor, blocksize, quant_type, quant_storage)
        self.fallbacks += 1
        self.why = self.why or why
        return func(*args, **kwargs)

    def note(self) -> str | None:
        """One line for the load's report, or ``None`` where no 4-bit weight was quantized here."""
        if not self.chunked and not self.fallbacks:
            return None
        line = (f"4-bit CPU quantization: {self.chunked} weight(s) by loadstone's chunked kernel (equal to "
                f"bitsandbytes' quantize_4bit, checked on a probe in this process)")
        if self.fallbacks:
            line += f", {self.fallbacks} by bitsandbytes' own op ({self.why})"
        return line
