"""instanttensor's ring buffer in the plan: 1 GiB, or the checkpoint's largest tensor where that
is bigger (instanttensor enlarges the ring to it by itself, so the plan must count it). Planned
for a CUDA device on any machine, from a sparse checkpoint (real headers, no data on the disk),
with instanttensor's presence forced; the loads run in tests/test_gpu*.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import loadstone
from loadstone.engines import native, page_cache
from loadstone.engines.instant import INSTANT_BUFFER, read_ahead_ring

sys.path.insert(0, str(Path(__file__).parent))  # tests/ is not a package (--import-mode=importlib)
from conftest import write_sparse_checkpoint  # noqa: E402

GiB = 1 << 30
VOCAB, WIDTH = 72000, 4096  # an embedding of 1.10 GiB in float32: bigger than the 1 GiB ring


@pytest.fixture(scope="module")
def wide_vocabulary(tmp_path_factory) -> str:
    from loadstone.testing import make_config

    config = make_config("llama", hidden_size=WIDTH, intermediate_size=256, num_hidden_layers=1,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=VOCAB, tie_word_embeddings=True)
    folder = tmp_path_factory.mktemp("wide") / "checkpoint"
    write_sparse_checkpoint(folder, config)
    return str(folder)


@pytest.fixture
def with_instanttensor(monkeypatch):
    monkeypatch.setattr(native, "instanttensor_installed", lambda: True)
    monkeypatch.setattr(page_cache, "cached_fraction", lambda paths: 1.0)


def _plan(folder: str, budget: str = "80GiB", **options):
    return loadstone.plan(folder, placement="auto", max_memory={"cuda:0": budget}, dtype="float32",
                          engine="loadstone", engine_options=options)


def test_the_plan_counts_the_ring_instanttensor_enlarges_to_the_largest_tensor(wide_vocabulary, with_instanttensor):
    largest = VOCAB * WIDTH * 4
    assert largest > INSTANT_BUFFER
    plan = _plan(wide_vocabulary)
    assert plan.engine_options["reader"] == "instanttensor"
    assert plan.report.engine["extra_bytes"] == {"cuda:0": largest}
    assert plan.peak_bytes_per_device["cuda:0"] >= plan.bytes_per_device["cuda:0"] + largest


def test_auto_takes_pread_where_the_enlarged_ring_does_not_fit(wide_vocabulary, with_instanttensor):
    """Room for 1 GiB beside the model but not for the 1.10 GiB the ring will take: pread."""
    model = _plan(wide_vocabulary, reader="pread").peak_bytes_per_device["cuda:0"]
    tight = _plan(wide_vocabulary, budget=str(model + INSTANT_BUFFER + (16 << 20)))
    assert tight.engine_options["reader"] == "pread" and tight.fits
    roomy = _plan(wide_vocabulary, budget=str(model + VOCAB * WIDTH * 4 + (16 << 20)))
    assert roomy.engine_options["reader"] == "instanttensor" and roomy.fits


def test_a_small_checkpoint_is_counted_the_1_gib_ring(tiny_checkpoint, with_instanttensor):
    plan = _plan(str(tiny_checkpoint("llama")))
    assert plan.report.engine["extra_bytes"] == {"cuda:0": INSTANT_BUFFER}


@pytest.mark.parametrize("free, asked, ring", [
    (140 * GiB, None, 16 * GiB),  # the whole checkpoint
    (140 * GiB, 1 * GiB, 2 * GiB),  # an asked ring smaller than the largest tensor is that tensor's size
    (75 * GiB // 2, None, 5 * GiB // 2),  # 2.5 GiB of room: as much, the largest tensor fits
    (73 * GiB // 2, None, 0),  # 1.5 GiB: more than 1 GiB, less than the largest tensor: none
])
def test_no_read_ahead_ring_is_smaller_than_the_largest_tensor(free, asked, ring):
    """16 GiB of weights whose largest tensor is 2 GiB, a model of 34 GiB on the device: the room
    beside it (free - 34 GiB - the 1 GiB margin) decides."""
    needed = 34 * GiB
    got = read_ahead_ring(free, needed, 16 * GiB, asked, largest=2 * GiB)
    assert got == ring


def test_the_chunk_instanttensor_is_asked_for_follows_the_io_mode():
    """4 MiB through the page cache (measured faster there), instanttensor's own 8 MiB for direct
    reads; a given size or count as given."""
    from loadstone.engines.instant import DIRECT_CHUNK, INSTANT_CHUNK, _depth_and_chunk

    assert _depth_and_chunk({}) == (1, INSTANT_CHUNK) == (1, 4 << 20)
    assert _depth_and_chunk({"io": "buffered"}) == (1, INSTANT_CHUNK)
    assert _depth_and_chunk({"io": "direct"}) == (1, DIRECT_CHUNK) == (1, 8 << 20)
    assert _depth_and_chunk({"io": "direct", "readers": 64, "chunk_bytes": 1 << 20}) == (64, 1 << 20)
