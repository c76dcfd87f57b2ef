"""The chunked CPU 4-bit kernel (loadstone_bnb.cpu_quantize): equal bit for bit to bitsandbytes'
quantize_4bit op, checked before use, and bitsandbytes' own op wherever it is not taken."""

from __future__ import annotations

import pytest
import torch

import loadstone
from loadstone_bnb import cpu_quantize
from loadstone_bnb.cpu_quantize import ChunkedOnCpu, probe, quantize_in_pieces, settle

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def bitsandbytes_op(tensor, blocksize, quant_type, storage):
    return torch.ops.bitsandbytes.quantize_4bit.default(tensor, blocksize, quant_type, storage)


def chunked(tensor, blocksize, quant_type, storage, **kwargs):
    return quantize_in_pieces(tensor, blocksize, quant_type, storage, bitsandbytes_op, **kwargs)


def same_bytes(ours, theirs) -> bool:
    return all(a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))
               for a, b in zip(ours, theirs))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("chunk", [128, 1000, cpu_quantize.CHUNK])
@pytest.mark.parametrize("ours", [True, False], ids=["counted", "bitsandbytes-in-pieces"])
def test_equal_to_bitsandbytes_bit_for_bit(quant_type, dtype, blocksize, chunk, ours):
    generator = torch.Generator().manual_seed(blocksize + chunk)
    weight = (torch.randn(96, 320, generator=generator) * 0.02).to(dtype)
    weight[3, :] = 0.0  # an all-zero block: its scale is 0 and every value scales to 0
    weight[7, 5] = weight[7, 6] = 1.0  # ties for the block's maximum
    for tensor in (weight, weight.reshape(-1)[:-33]):  # whole blocks; an odd partial block at the end
        result = chunked(tensor, blocksize, quant_type, torch.uint8, chunk=chunk, ours=ours)
        assert same_bytes(result, bitsandbytes_op(tensor, blocksize, quant_type, torch.uint8))


def test_the_plan_counts_the_kernel_s_own_piece():
    from loadstone_bnb import memory

    assert memory.CHUNKED_PIECE == cpu_quantize.CHUNK


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float16, torch.float32])
def test_packed_storage_dtypes(storage):
    weight = probe(torch.bfloat16, 64, "nf4")
    ours = chunked(weight, 64, "nf4", storage)
    assert ours[0].dtype == storage
    assert same_bytes(ours, bitsandbytes_op(weight, 64, "nf4", storage))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_probe_values_include_nan_inf_and_midpoints(quant_type):
    values = probe(torch.float32, 64, quant_type)
    assert values.isnan().any() and values.isinf().any() and (values == 0).all(dim=1).any()
    midpoints = torch.tensor(cpu_quantize.code_midpoints(quant_type)[0])
    assert torch.isin(midpoints, values).all()  # scaled by a block maximum of exactly 1.0
    assert settle(torch.float32, 64, quant_type, torch.uint8) == ("chunked", None)


def test_the_mode_replaces_only_bitsandbytes_quantize_4bit_inside_it():
    import bitsandbytes as bnb

    weight = torch.randn(64, 192, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    mode = ChunkedOnCpu()
    with mode:
        inside, state = bnb.functional.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)
        partial, _ = bnb.functional.quantize_4bit(weight.reshape(-1)[:100], blocksize=64, quant_type="nf4")
    outside, reference = bnb.functional.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert torch.equal(inside, outside)
    assert torch.equal(state.absmax, reference.absmax) and torch.equal(state.offset, reference.offset)
    assert torch.equal(state.state2.absmax, reference.state2.absmax)
    assert torch.equal(partial, bnb.functional.quantize_4bit(weight.reshape(-1)[:100], blocksize=64,
                                                             quant_type="nf4")[0])
    assert mode.counts == {"chunked": 2, "pieces": 0, "whole": 0}
    assert mode.note().startswith("4-bit CPU quantization: 2 weight(s) by loadstone's chunked kernel")


def test_a_kernel_that_differs_is_not_used(monkeypatch):
    """A bitsandbytes whose rounding changed: the probe shows the difference, and bitsandbytes' op
    runs instead, a chunk at a time."""
    import bitsandbytes as bnb

    real = cpu_quantize.quantize_chunk

    def off_by_one(*args, **kwargs):
        packed, absmax = real(*args, **kwargs)
        return packed ^ 1, absmax

    monkeypatch.setattr(cpu_quantize, "quantize_chunk", off_by_one)
    monkeypatch.setattr(cpu_quantize, "_checked", {})
    weight = probe(torch.float16, 64, "fp4")
    mode = ChunkedOnCpu()
    with mode:
        packed, _ = bnb.functional.quantize_4bit(weight, blocksize=64, quant_type="fp4")
    assert torch.equal(packed, bitsandbytes_op(weight, 64, "fp4", torch.uint8)[0])
    assert mode.counts == {"chunked": 0, "pieces": 1, "whole": 0}
    assert "packed codes differ" in mode.why and "1 by bitsandbytes' op in chunks" in mode.note()


def test_an_op_that_is_not_blockwise_runs_on_the_whole_weight(monkeypatch):
    """Neither way equals the op on the probe (an op whose blocks depend on each other): the op
    runs on the whole weight, as without loadstone."""
    monkeypatch.setattr(cpu_quantize, "_checked", {})
    monkeypatch.setattr(cpu_quantize, "quantize_in_pieces", lambda *args, **kwargs: (_ for _ in ()).throw(
        RuntimeError("no pieces")))
    assert settle(torch.bfloat16, 64, "nf4", torch.uint8) == ("whole", "RuntimeError: no pieces")


@pytest.mark.parametrize("method", ["nf4", "fp4"])
def test_a_load_quantizes_with_either_and_gets_the_same_model(tiny_checkpoint, method):
    folder = str(tiny_checkpoint("llama"))
    loads = {name: loadstone.load(folder, quantization=method, placement="cpu", trainable=False, progress=False,
                                  engine="loadstone", quantization_options={"cpu_quantizer": name})
             for name in ("chunked", "bitsandbytes")}
    chunked, theirs = (loads[n].model.state_dict() for n in ("chunked", "bitsandbytes"))
    assert sorted(chunked) == sorted(theirs)
    assert all(torch.equal(chunked[k], theirs[k]) for k in chunked if isinstance(chunked[k], torch.Tensor))
    notes = {name: [n for n in load.report.notes if n.startswith("4-bit CPU quantization")]
             for name, load in loads.items()}
    assert notes["bitsandbytes"] == [] and "by loadstone's chunked kernel" in notes["chunked"][0]
    assert loads["chunked"].report.quantization["cpu_quantizer"].startswith("chunked")
    assert loads["bitsandbytes"].report.quantization["settings"]["cpu_quantizer"] == "bitsandbytes"
