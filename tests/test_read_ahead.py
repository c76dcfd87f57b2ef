"""Reading ahead (``Engine.read_ahead``): the kernel lets an engine start reading before the plan
only for loads whose request names the whole model's device, hands the read-ahead to the chosen
engine through ``plan.read_ahead``, closes it on every other path exactly once, and plans as if its
memory were free. The native engine's own read-ahead (instanttensor onto a CUDA device) is checked
in tests/test_gpu.py; here its choices that need no GPU."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import psutil
import pytest

import loadstone
from loadstone import PlacementError, PluginHookError
from loadstone.contract.placement import HELD_BY_READ_AHEAD, free_memory
from loadstone.engines.instant import INSTANT_BUFFER, READ_AHEAD_MARGIN, READ_AHEAD_MAX, read_ahead_ring
from loadstone.engines.native import NativeEngine

sys.path.insert(0, str(Path(__file__).parent))
from conftest import assert_same_weights  # noqa: E402

GiB = 1 << 30


class Recorded(loadstone.ReadAhead):
    """A read-ahead that holds nothing but a record of how it was used."""

    def __init__(self, device: str, files: list[str], device_bytes: dict[str, int]):
        self.device, self.files, self.device_bytes = device, files, device_bytes
        self.closed = 0

    def close(self) -> None:
        self.closed += 1


class Recording(NativeEngine):
    """The native engine, plus a read-ahead that records what the kernel did with it."""

    description = "records its read-aheads"

    def __init__(self, name: str, preference: int, *, holds: dict[str, int] | None = None,
                 refuses: bool = False, crashes: bool = False, fails_load: bool = False):
        self.name, self.preference = name, preference
        self.holds, self.refuses, self.crashes, self.fails_load = holds or {}, refuses, crashes, fails_load
        self.started: list[Recorded] = []
        self.seen_in_load: list[object] = []
        self.seen_in_extra_bytes: list[object] = []

    def read_ahead(self, request, inventory, device):
        if self.crashes:
            raise RuntimeError("read-ahead crashed")
        files = sorted({str(info.file) for info in inventory.tensors.values()})
        self.started.append(Recorded(device, files, dict(self.holds)))
        return self.started[-1]

    def problems(self, plan):
        return ["it refuses every plan"] if self.refuses else super().problems(plan)

    def extra_bytes(self, plan):
        self.seen_in_extra_bytes.append(plan.read_ahead)
        return super().extra_bytes(plan)

    def load(self, plan, ctx):
        self.seen_in_load.append(plan.read_ahead)
        if self.fails_load:
            raise RuntimeError("the engine failed mid-load")
        return super().load(plan, ctx)


def manager(*engines: Recording, hooks: object | None = None) -> loadstone.PluginManager:
    class Plugin:
        @loadstone.hookimpl
        def loadstone_register_engines(self, register):
            for engine in engines:
                register(engine)

    extra = [("read-ahead-tests", Plugin())] + ([("read-ahead-hooks", hooks)] if hooks else [])
    return loadstone.PluginManager(allow=[], disable=[], extra_plugins=extra)


@pytest.fixture(scope="module")
def llama(tiny_checkpoint) -> str:
    return str(tiny_checkpoint("llama", max_shard_size="200KB"))


def test_a_cpu_load_reads_ahead_and_the_engine_continues_it(llama):
    engine = Recording("recording", preference=50)
    loaded = loadstone.load(llama, placement="cpu", plugins=manager(engine), progress=False, trainable=False)
    (ahead,) = engine.started
    assert ahead.device == "cpu"
    assert len(ahead.files) == 3  # after inspect: the inventory of every shard
    assert engine.seen_in_load == [ahead] and engine.seen_in_extra_bytes == [ahead]
    assert ahead.closed == 1 and loaded.plan.read_ahead is None
    assert loaded.report.engine["read_ahead"] == {}
    reference = loadstone.load(llama, placement="cpu", engine="loadstone", progress=False, trainable=False)
    assert_same_weights(loaded.model, reference.model)


def test_a_plan_never_reads_ahead(llama):
    engine = Recording("recording", preference=50)
    plan = loadstone.plan(llama, placement="cpu", plugins=manager(engine))
    assert engine.started == [] and plan.read_ahead is None and "read_ahead" not in plan.report.engine


@pytest.mark.parametrize("placement", ["auto", "sequential", {"": "cpu"}], ids=["auto", "sequential", "dict"])
def test_placements_that_depend_on_the_plan_do_not_read_ahead(llama, placement):
    engine = Recording("recording", preference=50)
    loadstone.load(llama, placement=placement, plugins=manager(engine), progress=False, trainable=False)
    assert engine.started == [] and engine.seen_in_load == [None]


def test_a_device_this_machine_lacks_is_not_read_ahead(llama):
    engine = Recording("recording", preference=50)
    with pytest.raises(PlacementError, match="cuda:4096"):
        loadstone.load(llama, placement="cuda:4096", plugins=manager(engine), progress=False)
    assert engine.started == []


def test_auto_asks_the_engine_tried_first_and_a_named_engine_is_asked_itself(llama):
    late = Recording("recording-late", preference=950)
    loadstone.load(llama, placement="cpu", plugins=manager(late), progress=False, trainable=False)
    assert late.started == []  # auto asked the native engine (which reads ahead onto CUDA only)
    loadstone.load(llama, placement="cpu", engine="recording-late", plugins=manager(late), progress=False,
                   trainable=False)
    assert len(late.started) == 1 and late.started[0].closed == 1


def test_another_engine_chosen_closes_the_read_ahead_before_the_load(llama):
    refusing = Recording("recording", preference=50, refuses=True)
    closed_when_loaded = []

    class Hooks:
        @loadstone.hookimpl
        def loadstone_model_loaded(self, model, plan, request):
            closed_when_loaded.append(refusing.started[0].closed)

    loaded = loadstone.load(llama, placement="cpu", plugins=manager(refusing, hooks=Hooks()), progress=False,
                            trainable=False)
    assert loaded.report.engine["name"] == "loadstone"
    assert closed_when_loaded == [1] and refusing.started[0].closed == 1 and refusing.seen_in_load == []


def test_a_plan_that_fails_closes_the_read_ahead(llama):
    engine = Recording("recording", preference=50)
    with pytest.raises(PlacementError, match="does not fit"):
        loadstone.load(llama, placement="cpu", max_memory={"cpu": "1KiB"}, plugins=manager(engine), progress=False)
    assert [a.closed for a in engine.started] == [1]


def test_the_read_ahead_starts_before_the_configuration_and_a_bad_one_closes_it(llama, tmp_path):
    """The engine may start reading as soon as the weight headers are checked: a configuration
    refused after that (here one whose model is code the checkpoint ships, remote code not allowed) still
    fails as a config error, and the read-ahead is closed once."""
    import shutil

    copy = tmp_path / "remote-code"
    shutil.copytree(llama, copy)
    config = json.loads((copy / "config.json").read_text())
    config.update(model_type="custom-llama", auto_map={"AutoModelForCausalLM": "modeling_custom.CustomModel"})
    (copy / "config.json").write_text(json.dumps(config))
    engine = Recording("recording", preference=50)
    with pytest.raises(loadstone.ConfigError, match="trust_remote_code"):
        loadstone.load(str(copy), placement="cpu", plugins=manager(engine), progress=False)
    assert [a.closed for a in engine.started] == [1]


def test_an_after_plan_hook_that_fails_closes_the_read_ahead(llama):
    engine = Recording("recording", preference=50)

    class Hooks:
        @loadstone.hookimpl
        def loadstone_after_plan(self, plan, request):
            raise loadstone.LoadstoneError("this plan is not allowed here")

    with pytest.raises(loadstone.LoadstoneError, match="not allowed"):
        loadstone.load(llama, placement="cpu", plugins=manager(engine, hooks=Hooks()), progress=False)
    assert [a.closed for a in engine.started] == [1]


def test_a_load_that_fails_closes_the_read_ahead(llama):
    engine = Recording("recording", preference=50, fails_load=True)
    with pytest.raises(PluginHookError, match="failed mid-load"):
        loadstone.load(llama, placement="cpu", plugins=manager(engine), progress=False)
    assert [a.closed for a in engine.started] == [1]


def test_a_read_ahead_that_crashes_is_a_plugin_error_naming_the_engine(llama):
    engine = Recording("recording", preference=50, crashes=True)
    with pytest.raises(PluginHookError, match="read-ahead-tests") as caught:
        loadstone.load(llama, placement="cpu", plugins=manager(engine), progress=False)
    assert caught.value.stage == "plan"


def test_the_plan_counts_what_the_read_ahead_holds_as_free(llama):
    held = 512 * GiB
    engine = Recording("recording", preference=50, holds={"cpu": held})
    loaded = loadstone.load(llama, placement="cpu", plugins=manager(engine), progress=False, trainable=False)
    budget = loaded.report.placement["budget"]["cpu"]
    available = psutil.virtual_memory().available
    assert abs(budget - held - available) < 4 * GiB  # what the host had free then, plus the read-ahead's
    assert HELD_BY_READ_AHEAD.get() == {}  # and only while that plan was made
    assert free_memory([])["cpu"] < held


@pytest.mark.parametrize("free,needed,checkpoint,asked,ring", [
    (140 * GiB, 16 * GiB, 16 * GiB, None, 16 * GiB),  # an 8B model on an H200: the whole checkpoint
    (140 * GiB, 32 * GiB, 32 * GiB, None, READ_AHEAD_MAX),  # a 16B one: the most that helps
    (140 * GiB, 2 * GiB, 2 * GiB, None, 2 * GiB),  # never more than the checkpoint
    (140 * GiB, 1 << 20, 1 << 20, None, INSTANT_BUFFER),  # nor less than the ring a load uses anyway
    (140 * GiB, 16 * GiB, 16 * GiB, 4 * GiB, 4 * GiB),  # the user's size
    (24 * GiB, 16 * GiB, 16 * GiB, None, 7 * GiB),  # a 24 GiB GPU: 8 GiB left, less the margin
    (26 * GiB, 16 * GiB, 16 * GiB, None, 9 * GiB),  # 9 GiB beside the model
    (14 * GiB, 2 * GiB, 16 * GiB, None, 7 * GiB),  # 11 GiB beside an NF4 model, but instanttensor takes half of 14
    (18 * GiB, 16 * GiB, 16 * GiB, None, INSTANT_BUFFER),  # 1 GiB of room: the smallest ring
    (35 * GiB // 2, 16 * GiB, 16 * GiB, None, 0),  # half a GiB of room: none
    (40 * GiB, 16 * GiB, 16 * GiB, None, 16 * GiB),  # 23 GiB room, 20 GiB half: the checkpoint fits
    (40 * GiB, 16 * GiB, 16 * GiB, 32 * GiB, 16 * GiB),  # an asked size, cut to the checkpoint
    (40 * GiB, 8 * GiB, 32 * GiB, 24 * GiB, 0),  # an asked size that does not fit: no read-ahead
    (3 * GiB, 4 * GiB, 4 * GiB, None, 0),  # the model alone does not fit
])
def test_the_ring_fits_beside_the_model(free, needed, checkpoint, asked, ring):
    assert read_ahead_ring(free, needed, checkpoint, asked) == ring


def test_the_ring_leaves_the_margin(tmp_path):
    free, needed = 20 * GiB, 10 * GiB
    ring = read_ahead_ring(free, needed, 10 * GiB, None)
    assert ring == free - needed - READ_AHEAD_MARGIN
    assert read_ahead_ring(free, needed, 10 * GiB, free - needed - READ_AHEAD_MARGIN + 1) == 0


@pytest.mark.parametrize("max_memory, budget", [(None, None), ({"cuda:0": "6GiB"}, 6 * GiB), ({0: "2GiB"}, 2 * GiB),
                                                ({"cuda:1": "6GiB", "cpu": "8GiB"}, None)])
def test_the_users_budget_for_the_device_bounds_the_ring(llama, monkeypatch, max_memory, budget):
    """The plan holds the ring to ``max_memory``: a ring sized by the free memory alone would be
    read into and then given back at plan time."""
    from loadstone.contract.request import LoadRequest
    from loadstone.engines import native, page_cache

    inventory = loadstone.plan(llama, placement="cpu").inventory
    seen = []
    monkeypatch.setattr(native, "start_read_ahead", lambda inventory, device, opts, **kw: seen.append(kw))
    monkeypatch.setattr(page_cache, "cached_fraction", lambda paths: 1.0)
    request = LoadRequest(reference=llama, placement="cuda:0", max_memory=max_memory)
    request.validate()
    NativeEngine().read_ahead(request, inventory, "cuda:0")
    assert seen == [{"wider": 1, "budget": budget}]


@pytest.mark.parametrize("options", [{}, {"reader": "pread"}, {"read_ahead": "off"}, {"readers": "many"}])
def test_the_native_engine_reads_ahead_onto_cuda_only(llama, options):
    """On the CPU, with another reader, when switched off, or with options the plan will refuse:
    no read-ahead, and no error before the plan's own."""
    from loadstone.contract.request import LoadRequest

    plan = loadstone.plan(llama, placement="cpu")
    request = LoadRequest(reference=llama, placement="cuda:0", engine_options=options)
    engine = NativeEngine()
    assert engine.read_ahead(request, plan.inventory, "cpu") is None
    if options:  # the reader and the switch are read before CUDA or instanttensor is asked anything
        assert engine.read_ahead(request, plan.inventory, "cuda:0") is None


@pytest.fixture
def native_starts(llama, monkeypatch):
    """``ask(cached=..., **request_fields)``: whether the native engine starts instanttensor for a
    CUDA load of ``llama`` (``start_read_ahead`` recorded, not run, so no GPU is needed), with the
    page cache answering ``cached`` (forced: the test does not depend on what this machine has
    cached). ``ask.asked`` holds the files the page cache was asked about."""
    from loadstone.contract.request import LoadRequest
    from loadstone.engines import native, page_cache

    inventory = loadstone.plan(llama, placement="cpu").inventory

    def ask(cached=1.0, **fields):
        started, ask.asked = [], []
        monkeypatch.setattr(native, "start_read_ahead", lambda inventory, device, opts, **kw: started.append(opts))
        monkeypatch.setattr(page_cache, "cached_fraction", lambda paths: ask.asked.append(list(paths)) or cached)
        request = LoadRequest(reference=llama, placement="cuda:0", **fields)
        assert NativeEngine().read_ahead(request, inventory, "cuda:0") is None  # what the recorder returned
        return bool(started)

    ask.files = native.checkpoint_files(inventory)
    return ask


@pytest.mark.parametrize("quantization, options, reads_ahead", [
    ("nf4", {}, False), ("int8", {"read_ahead": "auto"}, False), ("nf4", {"read_ahead": "2GiB"}, True),
    (None, {}, True), ("none", {}, True)])
def test_a_quantizing_load_reads_ahead_only_when_given_a_ring_size(native_starts, quantization, options, reads_ahead):
    """Quantized on the device, the model is a third of the checkpoint: an automatic ring would
    hold more device memory than the model. Whether the engine starts instanttensor is decided
    before CUDA is asked anything, so it is seen here on any machine."""
    assert native_starts(quantization=quantization, engine_options=options) == reads_ahead


@pytest.mark.parametrize("cached, options, reads_ahead", [
    (0.0, {}, False), (0.4, {"read_ahead": "auto"}, False), (0.0, {"read_ahead": "2GiB"}, True),
    (0.5, {}, True), (1.0, {}, True), (None, {}, True)])
def test_a_checkpoint_out_of_the_page_cache_is_read_after_the_plan(native_starts, cached, options, reads_ahead):
    """Cold, the readers would queue the import of the model's code behind the weights; a ring size
    given is read ahead anyway, and where the cache cannot be asked (None) the load reads ahead."""
    assert native_starts(cached=cached, engine_options=options) == reads_ahead
    assert native_starts.asked in ([], [native_starts.files])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mincore and posix_fadvise are Linux's")
def test_the_page_cache_is_asked_without_reading(disk_folder):
    from loadstone.engines.page_cache import cached_fraction

    folder = str(disk_folder)
    path = os.path.join(folder, "weights.bin")
    with open(path, "wb") as fh:
        fh.write(os.urandom(8 << 20))
        fh.flush()
        os.fsync(fh.fileno())
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    assert cached_fraction([path]) < 0.5
    assert cached_fraction([path]) < 0.5  # asking read nothing in
    with open(path, "rb") as fh:
        fh.read()
    assert cached_fraction([path]) == 1.0
    empty = os.path.join(folder, "empty.bin")
    open(empty, "wb").close()
    assert cached_fraction([empty]) is None and cached_fraction([]) is None
    assert cached_fraction([os.path.join(folder, "missing.bin")]) is None


@pytest.mark.parametrize("value,stored", [("auto", "auto"), ("off", 0), (0, 0), ("0", 0), ("4GiB", 4 * GiB),
                                          (2 * GiB, 2 * GiB), ("1TiB", 1 << 40)])
def test_read_ahead_option_values(llama, value, stored):
    plan = loadstone.plan(llama, placement="cpu", engine_options={"read_ahead": value})
    assert plan.engine_options["read_ahead"] == stored


@pytest.mark.parametrize("value", ["256MiB", True, False, -1, "lots", float("nan"), float("inf"), [4], {"a": 1},
                                   None, "2TiB"])
def test_bad_read_ahead_options_are_refused_at_plan_time(llama, value):
    with pytest.raises(loadstone.OptionError) as caught:
        loadstone.plan(llama, placement="cpu", engine_options={"read_ahead": value})
    assert caught.value.field == "engine option read_ahead"


@pytest.mark.parametrize("local_rank", ["x", "", "4096"])
def test_rank_names_no_device_for_a_local_rank_place_would_refuse(monkeypatch, local_rank):
    import torch

    from loadstone.builtin.placement import RankPlacement

    monkeypatch.setenv("LOCAL_RANK", local_rank)
    expected = "cpu" if local_rank == "4096" and not torch.cuda.is_available() else None
    assert RankPlacement().whole_model_device("rank") == expected


def test_rank_names_the_device_place_uses(monkeypatch):
    import torch

    from loadstone.builtin.placement import RankPlacement

    monkeypatch.setenv("LOCAL_RANK", "0")
    assert RankPlacement().whole_model_device("rank") == (0 if torch.cuda.is_available() else "cpu")
