"""4-bit quantization on the CPU in cache-sized chunks, equal bit for bit to bitsandbytes' own.

bitsandbytes (0.46-0.50) has no CPU kernel for ``quantize_4bit``: its default op scales the whole
weight in float32 and finds each value's code with ``torch.bucketize``, several full-size passes
over memory plus a binary search per value (about 20 ns per value on the project's 2-core machine;
most of a CPU NF4 load), with about ten bytes of work memory per value. The code book has 16
entries, so a value's code is the number of the 15 midpoints between codes that lie below it,
which 15 element-wise comparisons count; done 256 Ki values at a time, everything stays in the
CPU's cache. That is 2.5-4x faster, with a few megabytes of work memory whatever the weight.

Equality is not assumed, it is checked: before its first use in a process (per quant type, block
size, storage and input dtype) the chunked kernel quantizes a probe of awkward values (zero,
negative zero, subnormal, infinite and NaN blocks, values exactly on the midpoints, chunk edges,
a trailing partial block) and is compared with bitsandbytes' op on the whole probe. Where any
byte differs (a later bitsandbytes that changes its rounding), bitsandbytes' op runs instead,
still a chunk at a time (blocks are independent), so the work memory stays as small as the plan
counts it (:func:`loadstone_bnb.memory.cpu_quantize_workspace`); the load's report says which.

Only the integer codes and block scales come from here: :class:`ChunkedOnCpu` stands in for the
one op call ``bitsandbytes.functional.quantize_4bit`` makes, which then builds the quantization
state (double quantization included) itself, as always.
"""

from __future__ import annotations

import functools
import threading
from typing import Any

from torch.overrides import TorchFunctionMode

CHUNK = 1 << 18  # values per step: 1 MiB of float32 work, within a core's L2 cache


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


def quantize_in_pieces(tensor: Any, blocksize: int, quant_type: str, quant_storage: Any, op: Any, *,
                       ours: bool = True, chunk: int = CHUNK) -> tuple[Any, Any]:
    """What ``torch.ops.bitsandbytes.quantize_4bit`` (``op``) returns for a float CPU ``tensor``,
    computed :data:`CHUNK` values at a time: the codes packed two per byte (first value in the
    high nibble), shaped ``(ceil(n / 2), 1)`` and viewed as ``quant_storage``, and the float32
    absolute maximum of each block of ``blocksize`` values.

    Blocks are quantized independently, so pieces of whole blocks give the whole tensor's result.
    Each piece is quantized by :func:`quantize_chunk` (``ours``) or by ``op`` itself, whose work
    memory then grows with the piece instead of the weight; a trailing partial block (which
    bitsandbytes scales by division, not by the reciprocal) always goes to ``op``."""
    import torch

    flat = tensor.reshape(-1)
    n = flat.numel()
    step = max(blocksize, chunk // blocksize * blocksize)
    whole = n - n % blocksize
    # devices named: a `with torch.device(...)` around the load must not move the work elsewhere
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=flat.device)
    packed = torch.empty(-(-n // 2), dtype=torch.uint8, device=flat.device)
    work = Workspace(min(step, whole)) if ours and whole else None
    for start in [*range(0, whole, step), *([whole] if whole < n else [])]:
        stop = min(whole, start + step) if start < whole else n
        piece = flat[start:stop]
        if work is not None and stop <= whole:
            codes, scales = quantize_chunk(piece, blocksize, quant_type, work)
        else:
            codes, scales = op(piece, blocksize, quant_type, torch.uint8)
        packed[start // 2:start // 2 + codes.numel()] = codes.reshape(-1)
        absmax[start // blocksize:start // blocksize + scales.numel()] = scales
    result = packed.unsqueeze(1)
    if quant_storage != torch.uint8:
        result = packed.view(quant_storage).unsqueeze(1)
    return result, absmax


class Workspace:
    """The chunk-sized buffers :func:`quantize_chunk` reuses from piece to piece."""

    def __init__(self, size: int) -> None:
        import torch

        self.values = torch.empty(size, dtype=torch.float32, device="cpu")
        self.count = torch.empty(size, dtype=torch.uint8, device="cpu")
        self.hit = torch.empty(size, dtype=torch.bool, device="cpu")


def quantize_chunk(piece: Any, blocksize: int, quant_type: str, work: Workspace) -> tuple[Any, Any]:
    """Packed codes and block scales of ``piece`` (whole blocks), by counting code midpoints."""
    import torch

    midpoints, order = code_midpoints(quant_type)
    size = piece.numel()
    values, count, hit = work.values[:size], work.count[:size], work.hit[:size]
    values.copy_(piece)
    blocks = values.view(-1, blocksize)
    scales = blocks.abs().max(dim=-1)[0]
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
    return (codes[::2] << 4) | codes[1::2], scales


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


# loadstone's kernel; bitsandbytes' op a chunk at a time; its op on the whole weight
WAYS = ("chunked", "pieces", "whole")
_checked: dict[tuple[str, int, str, str], tuple[str, str | None]] = {}
_checked_lock = threading.Lock()


def settle(dtype: Any, blocksize: int, quant_type: str, quant_storage: Any) -> tuple[str, str | None]:
    """How weights of this dtype are quantized with these arguments, one of :data:`WAYS`, and why
    not the way before it (``None`` for ``"chunked"``): the first way whose result on the
    :func:`probe` (with and without a trailing partial block) equals bitsandbytes' op on the whole
    probe. Asked once per process and argument set."""
    key = (str(dtype), blocksize, quant_type, str(quant_storage))
    with _checked_lock:
        if key not in _checked:
            _checked[key] = _compare(dtype, blocksize, quant_type, quant_storage)
        return _checked[key]


def _compare(dtype: Any, blocksize: int, quant_type: str, quant_storage: Any) -> tuple[str, str | None]:
    import torch

    op = torch.ops.bitsandbytes.quantize_4bit.default
    with torch.device("cpu"):  # the probe is a CPU tensor whatever default device the caller set
        values = probe(dtype, blocksize, quant_type).reshape(-1)
    why = None
    for way in WAYS[:2]:
        try:
            for tensor in (values, values[:-27]):
                theirs = op(tensor, blocksize, quant_type, quant_storage)
                for chunk in (CHUNK, 4 * blocksize):
                    ours = quantize_in_pieces(tensor, blocksize, quant_type, quant_storage, op, ours=way == "chunked",
                                              chunk=chunk)
                    for name, a, b in (("packed codes", ours[0], theirs[0]), ("block scales", ours[1], theirs[1])):
                        if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a.view(torch.uint8),
                                                                                        b.view(torch.uint8)):
                            raise ValueError(f"its {name} differ from bitsandbytes' quantize_4bit on a probe "
                                             f"({dtype}, {quant_type})")
        except Exception as exc:  # noqa: BLE001 (any failure means: the next way)
            why = why or (str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}")
            continue
        return way, why
    return "whole", why


class ChunkedOnCpu(TorchFunctionMode):
    """While active (``with ChunkedOnCpu():``, this thread only), bitsandbytes' ``quantize_4bit``
    op on a float CPU tensor runs :func:`quantize_in_pieces` the way :func:`settle` found equal to
    the op; any other call runs unchanged. :attr:`counts` says how many weights went each way,
    :attr:`why` why the first one did not go the chunked way."""

    def __init__(self) -> None:
        super().__init__()
        self.counts = dict.fromkeys(WAYS, 0)
        self.why: str | None = None

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        import torch

        kwargs = kwargs or {}
        if func is not torch.ops.bitsandbytes.quantize_4bit.default:
            return func(*args, **kwargs)
        named = dict(zip(("A", "blocksize", "quant_type", "quant_storage"), args), **kwargs)
        tensor, blocksize, quant_type, quant_storage = (named["A"], named["blocksize"], named["quant_type"],
                                                        named["quant_storage"])
        if tensor.device.type != "cpu" or tensor.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            return func(*args, **kwargs)  # bitsandbytes' own refusal or device kernel
        way, why = settle(tensor.dtype, blocksize, quant_type, quant_storage)
        self.counts[way] += 1
        self.why = self.why or why
        if way == "whole":
            return func(*args, **kwargs)
        return quantize_in_pieces(tensor, blocksize, quant_type, quant_storage, func, ours=way == "chunked")

    def note(self) -> str | None:
        """One line for the load's report, or ``None`` where no 4-bit weight was quantized here."""
        if not any(self.counts.values()):
            return None
        line = (f"4-bit CPU quantization: {self.counts['chunked']} weight(s) by loadstone's chunked kernel (equal "
                f"to bitsandbytes' quantize_4bit, checked on a probe in this process)")
        if self.counts["pieces"]:
            line += f", {self.counts['pieces']} by bitsandbytes' op in chunks"
        if self.counts["whole"]:
            line += f", {self.counts['whole']} by bitsandbytes' op on the whole weight"
        return line + (f" ({self.why})" if self.why else "")
