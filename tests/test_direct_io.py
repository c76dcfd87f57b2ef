"""The native engine's ``io`` option: how instanttensor reads the files (through the page cache, or
past it with O_DIRECT), settled at plan time from what the page cache holds. Planned here for a
CUDA device on any machine (plans read no weights), with instanttensor's presence forced so that
both answers of the page cache are seen without it; the loads run in tests/test_gpu_read_ahead.py."""

from __future__ import annotations

import pytest

import loadstone
from loadstone.engines import instant, native, page_cache

GiB = 1 << 30


@pytest.fixture
def llama(tiny_checkpoint) -> str:
    return str(tiny_checkpoint("llama", max_shard_size="200KB"))


@pytest.fixture
def gpu_plan(llama, monkeypatch):
    """``plan(cached=..., **options)``: a bf16 plan onto cuda:0 with instanttensor taken as installed
    and the page cache answering ``cached`` for the checkpoint's files."""
    monkeypatch.setattr(native, "instanttensor_installed", lambda: True)

    def plan(cached=1.0, **options):
        plan.asked = []
        monkeypatch.setattr(page_cache, "cached_fraction", lambda paths: plan.asked.append(sorted(paths)) or cached)
        return loadstone.plan(llama, placement="auto", max_memory={"cuda:0": "80GiB"}, engine="loadstone",
                              engine_options=options)

    return plan


@pytest.mark.parametrize("cached, asked, settled", [
    (0.0, "auto", "direct"), (0.49, "auto", "direct"), (0.5, "auto", "buffered"), (1.0, "auto", "buffered"),
    (None, "auto", "buffered"), (0.0, "buffered", "buffered"), (1.0, "direct", "direct")])
def test_auto_reads_a_cold_checkpoint_directly_and_a_warm_one_through_the_page_cache(gpu_plan, cached, asked, settled):
    plan = gpu_plan(cached=cached, io=asked)
    assert plan.engine_options["reader"] == "instanttensor"
    assert plan.engine_options["io"] == settled
    assert f"io={settled}" in plan.report.render()
    assert gpu_plan.asked == ([sorted(instant.checkpoint_files(plan.inventory))] if asked == "auto" else [])


@pytest.mark.parametrize("value", ["auto", "buffered"])
def test_the_pread_reader_takes_auto_and_buffered_and_says_nothing_of_them(llama, value):
    plan = loadstone.plan(llama, placement="cpu", engine="loadstone", engine_options={"io": value})
    assert plan.engine_options["reader"] in ("pread", "mmap")  # auto on the CPU: mmap where the cache is warm
    assert "io" not in plan.engine_options  # both read through the page cache: there is no choice to report


@pytest.mark.parametrize("value", ["DIRECT", "o_direct", "", True, 1, None, ["direct"], {"io": "direct"}, 0.5])
def test_other_values_are_refused_naming_the_option(llama, value):
    with pytest.raises(loadstone.OptionError) as caught:
        loadstone.plan(llama, placement="cpu", engine="loadstone", engine_options={"io": value})
    assert caught.value.field == "engine option io" and "auto, buffered, direct" in str(caught.value)


@pytest.mark.parametrize("reader", ["pread", "mmap"])
def test_direct_with_another_reader_is_refused_before_anything_is_read(llama, reader):
    with pytest.raises(loadstone.OptionError) as caught:
        loadstone.plan(llama, placement="cpu", engine="loadstone", engine_options={"io": "direct", "reader": reader})
    assert caught.value.field == "engine option io" and f"reader={reader}" in str(caught.value)


def test_direct_where_instanttensor_cannot_load_is_refused_with_the_fix(llama):
    """A CPU placement (or no instanttensor, or no room for its ring) leaves the pread reader."""
    with pytest.raises(loadstone.OptionError) as caught:
        loadstone.plan(llama, placement="cpu", engine="loadstone", engine_options={"io": "direct"})
    assert caught.value.field == "engine option io" and caught.value.fix == "drop io=direct"


def test_a_direct_read_is_never_read_ahead(llama, monkeypatch):
    """A read-ahead goes through the page cache (it is for a warm checkpoint); io=direct asks for the
    other way, so the engine does not start one, whatever the cache holds."""
    from loadstone.contract.request import LoadRequest

    inventory = loadstone.plan(llama, placement="cpu").inventory
    started = []
    monkeypatch.setattr(native, "start_read_ahead", lambda inventory, device, opts, **kw: started.append(opts))
    monkeypatch.setattr(page_cache, "cached_fraction", lambda paths: 1.0)
    for options, expected in (({"io": "direct"}, 0), ({"io": "direct", "read_ahead": "2GiB"}, 0),
                              ({"io": "buffered"}, 1), ({}, 2)):
        native.NativeEngine().read_ahead(LoadRequest(reference=llama, placement="cuda:0", engine_options=options),
                                         inventory, "cuda:0")
        assert len(started) == expected, options


def test_the_help_says_what_each_mode_costs():
    text = native.NativeEngine().option_help()["io"]
    assert "O_DIRECT" in text and "page cache" in text and "next load" in text
