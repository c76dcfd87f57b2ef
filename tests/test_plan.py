"""``loadstone.plan`` is the real load's device map, and it reads no weight data."""

from __future__ import annotations

import json
import shutil
import struct
import sys
from pathlib import Path

import pytest

import loadstone
from loadstone.telemetry import RssSampler, current_rss

sys.path.insert(0, str(Path(__file__).parent))  # tests/ is not a package (--import-mode=importlib)
from conftest import write_sparse_checkpoint  # noqa: E402

# (placement, cpu budget as a fraction of the model's bytes or None, offload?)
CASES = [
    ("auto", None, False),
    ("sequential", None, False),
    ("cpu", None, False),
    ("rank", None, False),
    ("auto", 0.55, True),        # embeddings on the CPU, the rest from disk
    ("auto", 0.9, True),         # a decoder layer on the CPU too
    ("sequential", 0.9, True),
    ("balanced", 0.7, True),
]


@pytest.fixture(scope="module")
def model_bytes(sharded_llama) -> int:
    return loadstone.plan(str(sharded_llama), placement="cpu").report.placement["estimated_bytes"]


@pytest.mark.parametrize("placement,fraction,offload", CASES)
def test_plan_equals_the_device_map_the_load_used(placement, fraction, offload, sharded_llama, model_bytes,
                                                  tmp_path, placed_as):
    kwargs = {"placement": placement}
    if fraction is not None:
        kwargs["max_memory"] = {"cpu": int(model_bytes * fraction)}
    if offload:
        kwargs["offload_folder"] = str(tmp_path / "offload")
    planned = loadstone.plan(str(sharded_llama), **kwargs)
    loaded = loadstone.load(str(sharded_llama), progress=False, **kwargs)

    assert planned.device_map == loaded.plan.device_map
    assert planned.bytes_per_device == loaded.plan.bytes_per_device
    # Everything the report says about placement agrees, except free memory measured at the time.
    without_budget = [{k: v for k, v in r.placement.items() if k != "budget" or fraction}
                      for r in (planned.report, loaded.report)]
    assert without_budget[0] == without_budget[1]
    # transformers records the map it dispatched with; it must be the plan's, entry for entry.
    hf_map = getattr(loaded.model, "hf_device_map", None) or {"": "cpu"}
    assert {k: str(v) for k, v in hf_map.items()} == {k: str(v) for k, v in planned.device_map.items()}
    placed_as(loaded.model, planned.device_map)
    # bytes per device add up to the model, and the disk share is what the map sends there
    assert sum(planned.bytes_per_device.values()) == model_bytes
    assert ("disk" in planned.bytes_per_device) == offload


def test_plan_fit_verdict_matches_what_load_does(sharded_llama, model_bytes):
    tight = {"cpu": int(model_bytes * 0.5)}
    planned = loadstone.plan(str(sharded_llama), placement="cpu", max_memory=tight)
    assert planned.fits is False
    assert any("max_memory" in line for line in planned.advice)
    with pytest.raises(loadstone.PlacementError) as info:
        loadstone.load(str(sharded_llama), placement="cpu", max_memory=tight, progress=False)
    assert planned.advice[0] in str(info.value)


def _scramble_data(folder: Path) -> None:
    """Overwrite every byte after each safetensors header with 0xFF (NaN in every float dtype),
    keeping headers, sizes and the index intact."""
    for shard in folder.glob("*.safetensors"):
        with open(shard, "r+b") as fh:
            header_len = struct.unpack("<Q", fh.read(8))[0]
            start = 8 + header_len
            size = shard.stat().st_size
            fh.seek(start)
            fh.write(b"\xff" * (size - start))


def test_plan_does_not_depend_on_weight_data(sharded_llama, tmp_path, reference_model, same_weights):
    scrambled = tmp_path / "scrambled"
    shutil.copytree(sharded_llama, scrambled)
    _scramble_data(scrambled)
    budget = {"max_memory": {"cpu": 400_000}, "offload_folder": str(tmp_path / "off"), "placement": "auto"}
    original = loadstone.plan(str(sharded_llama), **budget)
    garbage = loadstone.plan(str(scrambled), **budget)
    assert garbage.device_map == original.device_map
    assert garbage.bytes_per_device == original.bytes_per_device
    assert garbage.fits and garbage.parameter_count == original.parameter_count
    # ... while a load does read the data: its weights differ from the original's.
    loaded = loadstone.load(str(scrambled), placement="cpu", progress=False)
    with pytest.raises(AssertionError, match="differs"):
        same_weights(loaded.model, reference_model(sharded_llama))


def test_plan_of_a_large_checkpoint_maps_no_weight_pages(tmp_path):
    from loadstone.testing import make_config

    config = make_config("llama", hidden_size=2048, intermediate_size=5504, num_hidden_layers=6,
                         num_attention_heads=16, num_key_value_heads=16, vocab_size=32000)
    folder = tmp_path / "sparse"
    data_bytes = write_sparse_checkpoint(folder, config)
    assert data_bytes > 1.5e9
    rss_before = current_rss()
    with RssSampler(interval=0.001) as rss:
        planned = loadstone.plan(str(folder), placement="cpu", dtype="float32")
    assert planned.report.checkpoint["bytes"] > data_bytes
    # the stored tensors plus the non-persistent rotary buffer (128 floats)
    assert planned.bytes_per_device == {"cpu": data_bytes + 128 * 4}
    # Reading (or touching mapped pages of) the weights would add ~1.6 GB to this process's RSS.
    assert rss.peak < rss_before + 500 * 2**20


def test_budget_for_an_absent_gpu_plans_for_that_machine_and_refuses_to_load_here(sharded_llama):
    import torch

    if torch.cuda.is_available():
        pytest.skip("the machine has a GPU; this is about planning for one from a machine without")
    planned = loadstone.plan(str(sharded_llama), max_memory={"cuda:0": "1GiB"})
    assert planned.device_map == {"": 0} and planned.bytes_per_device == {"cuda:0": planned.report.placement[
        "estimated_bytes"]}
    assert any("cuda:0, which this machine does not have" in note for note in planned.report.notes)
    with pytest.raises(loadstone.PlacementError) as info:  # accelerate alone would only warn, then crash later
        loadstone.load(str(sharded_llama), max_memory={"cuda:0": "1GiB"}, progress=False)
    assert info.value.field == "max_memory" and info.value.found == "cuda:0"


@pytest.mark.parametrize(("written", "method"), [({"bits": 4, "group_size": 128}, "gptq"),
                                                 ({"quant_method": "somequant", "bits": 4}, "somequant")])
def test_a_quantize_config_nobody_reads_is_refused_not_loaded_plain(tiny_checkpoint, tmp_path, monkeypatch,
                                                                     written, method):
    # auto-gptq wrote only quantize_config.json; transformers ignores it and loads random layers.
    folder = tmp_path / "legacy"
    shutil.copytree(tiny_checkpoint("llama"), folder)
    (folder / "quantize_config.json").write_text(json.dumps(written))
    monkeypatch.setenv("LOADSTONE_PLUGINS", "")  # only the built-ins: nobody reads the file
    with pytest.raises(loadstone.ComponentNotFoundError) as info:
        loadstone.plan(str(folder), placement="cpu", plugins=loadstone.PluginManager())
    error = info.value
    assert error.file == str(folder / "quantize_config.json") and error.found == method
    assert "silently wrong" in error.message and error.fix
    if method == "gptq":
        assert "loadstone-gptq" in error.fix


@pytest.mark.parametrize("values, expected", [
    (["cpu"], []), (["cuda:1", 0, "cpu", "disk"], [0, 1]), (["cuda", "cuda:0", "1"], [0, 1]),
    (["mps"], None), (["cpu", "xpu:0"], None)])
def test_the_budget_asks_only_the_gpus_a_map_uses(values, expected):
    # None: another accelerator, whose free memory only accelerate's detection (of every device) knows
    from loadstone.contract.placement import cuda_devices_of

    assert cuda_devices_of(values) == expected


def test_memory_budget_of_the_devices_a_strategy_uses(sharded_llama):
    """Detection asks only the devices named (a CUDA context per GPU asked); the user's max_memory
    is the budget whatever devices are named."""
    seen = {}

    class Probe(loadstone.PlacementStrategy):
        name = "probe"

        def place(self, ctx):
            seen.setdefault("named", []).append(ctx.memory_budget(["cpu", "disk"]))
            seen.setdefault("every", []).append(ctx.memory_budget())
            seen.setdefault("free", []).append((ctx.free_bytes("cpu"), ctx.free_bytes(63), ctx.free_bytes("mps")))
            return {"": "cpu"}

    class ProbePlugin:
        @loadstone.hookimpl
        def loadstone_register_placement_strategies(self, register):
            register(Probe())

    plugins = loadstone.PluginManager(allow=[], extra_plugins=[("probe", ProbePlugin())])
    plan = loadstone.plan(sharded_llama, placement="probe", plugins=plugins)
    named, every = seen["named"][0], seen["every"][0]
    assert set(named) == {"cpu"} and "cpu" in every
    import psutil

    total = psutil.virtual_memory().total  # available memory moves between calls: bound it
    assert 0 < named["cpu"] <= total and 0 < every["cpu"] <= total
    # one device at a time, as the budget counts it; none for a GPU this machine lacks or another accelerator
    free_cpu, free_absent_gpu, free_mps = seen["free"][0]
    assert 0 < free_cpu <= total and free_absent_gpu == 0 and free_mps == 0
    assert set(plan.report.placement["budget"]) == {"cpu"}  # the kernel's fit check asks the map's devices

    plan = loadstone.plan(sharded_llama, placement="probe", plugins=plugins, max_memory={"cpu": "3GiB", 0: "1GiB"})
    assert seen["named"][1] == seen["every"][1] == {0: 2**30, "cpu": 3 * 2**30}
