"""``placement="even"`` and ``"layers:N"`` on real model skeletons. A CPU machine plans for GPUs it
does not have by giving them ``max_memory`` budgets; loads on GPUs are in test_gpu.py."""

from __future__ import annotations

import contextlib
import io

import pytest
import torch

import loadstone
from loadstone.cli import main as cli

GIB = 2**30
TWO_GPUS = {"cuda:0": GIB, "cuda:1": GIB}


@pytest.fixture(scope="module")
def deep_llama(tiny_checkpoint):
    return tiny_checkpoint("llama", num_hidden_layers=8)


@pytest.mark.parametrize("quantization", [None, "nf4"])
def test_even_balances_bytes_after_quantization(deep_llama, plugins, write_map, quantization):
    planned = loadstone.plan(str(deep_llama), placement="even", max_memory=TWO_GPUS, quantization=quantization,
                             plugins=plugins)
    per_device = planned.bytes_per_device
    assert set(per_device) == {"cuda:0", "cuda:1"}
    device_map = planned.device_map
    assert device_map["model.embed_tokens"] == 0 and device_map["lm_head"] == 1
    on_0 = [i for i in range(8) if device_map[f"model.layers.{i}"] == 0]
    assert on_0 == list(range(len(on_0)))  # a contiguous run from the first layer
    # The split balances the bytes the load will hold (quantized layers are ~7x smaller than the
    # full-precision embeddings and head nf4 keeps), so the two GPUs differ by at most one layer.
    rules = write_map("model.layers.0: cuda:1\n" + "".join(f"{m}: cuda:0\n" for m in (
        "model.embed_tokens", "model.layers.[1-7]", "model.norm", "model.rotary_emb", "lm_head")))
    one_layer = loadstone.plan(str(deep_llama), placement=f"file:{rules}", quantization=quantization,
                               max_memory=TWO_GPUS, plugins=plugins).bytes_per_device["cuda:1"]
    assert abs(per_device["cuda:0"] - per_device["cuda:1"]) <= one_layer, per_device
    assert "decoder layers split evenly by bytes over cuda:0, cuda:1" in planned.report.decision("placement").reason


def test_layers_n_uses_the_first_n_gpus(deep_llama, plugins):
    budgets = {f"cuda:{i}": GIB for i in range(4)}
    planned = loadstone.plan(str(deep_llama), placement="layers:3", max_memory=budgets, plugins=plugins)
    assert set(planned.bytes_per_device) == {"cuda:0", "cuda:1", "cuda:2"}
    assert sorted({d for d in planned.device_map.values()}) == [0, 1, 2]
    with pytest.raises(loadstone.PlacementError, match="splits over 5 GPUs, but 4 are visible or budgeted"):
        loadstone.plan(str(deep_llama), placement="layers:5", max_memory=budgets, plugins=plugins)
    for bad in ("layers:0", "layers:two", "layers"):
        with pytest.raises(loadstone.PlacementError, match="cannot read the number of GPUs"):
            loadstone.plan(str(deep_llama), placement=bad, max_memory=budgets, plugins=plugins)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a machine without GPUs gets")
def test_even_without_gpus_says_how_to_plan_for_them(deep_llama, plugins):
    with pytest.raises(loadstone.PlacementError) as info:
        loadstone.plan(str(deep_llama), placement="even", plugins=plugins)
    assert "none is visible" in str(info.value) and "--max-memory cuda:0=" in info.value.fix


def test_budgets_bound_each_gpu_and_the_rest_spills_to_cpu_then_disk(deep_llama, plugins, tmp_path):
    full = loadstone.plan(str(deep_llama), placement="even", max_memory=TWO_GPUS, plugins=plugins)
    total = full.report.placement["estimated_bytes"]
    small = {"cuda:0": total // 4, "cuda:1": total // 4}
    planned = loadstone.plan(str(deep_llama), placement="even", max_memory={**small, "cpu": total // 4},
                             offload_folder=str(tmp_path / "off"), plugins=plugins)
    peaks = planned.peak_bytes_per_device
    assert peaks["cuda:0"] <= total // 4 and peaks["cuda:1"] <= total // 4 and peaks["cpu"] <= total // 4
    assert "disk" in planned.bytes_per_device
    order = [planned.device_map[f"model.layers.{i}"] for i in range(8)]
    assert order == sorted(order, key=lambda d: ({0: 0, 1: 1, "cpu": 2, "disk": 3}[d]))  # trailing layers spill
    assert "trailing layer(s) go to cpu and disk" in planned.report.decision("placement").reason
    # with nowhere to spill, the plan shows the even split and says it does not fit
    planned = loadstone.plan(str(deep_llama), placement="even", max_memory=small, plugins=plugins)
    assert not planned.fits and "does not fit" in planned.report.decision("placement").reason


def test_tied_embeddings_and_head_stay_together(tiny_checkpoint, plugins):
    gpt2 = tiny_checkpoint("gpt2", n_layer=6)
    planned = loadstone.plan(str(gpt2), placement="even", max_memory=TWO_GPUS, plugins=plugins)
    device_map = planned.device_map
    assert device_map["transformer.wte"] == device_map["lm_head"]
    assert "tied embeddings and head on" in planned.report.decision("placement").reason


@pytest.mark.parametrize("arch", ["qwen2_moe", "gemma", "mixtral"])
def test_other_architectures_split(tiny_checkpoint, plugins, arch):
    checkpoint = tiny_checkpoint(arch, num_hidden_layers=4)
    planned = loadstone.plan(str(checkpoint), placement="even", max_memory=TWO_GPUS, plugins=plugins)
    assert set(planned.bytes_per_device) == {"cuda:0", "cuda:1"}
    assert planned.fits


def test_the_cli_shows_each_devices_modules_and_bytes(deep_llama, monkeypatch):
    monkeypatch.delenv("LOADSTONE_PLUGINS", raising=False)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli(["plan", str(deep_llama), "--placement", "even", "--max-memory", "cuda:0=1GiB",
                    "--max-memory", "cuda:1=1GiB"])
    assert code == 0
    lines = {line.split()[0]: line for line in out.getvalue().splitlines() if line.startswith("  cuda:")}
    assert "model.embed_tokens, model.layers.0-3" in lines["cuda:0"], out.getvalue()
    assert "model.layers.4-7, model.norm, model.rotary_emb, lm_head" in lines["cuda:1"], out.getvalue()
    assert "KiB" in lines["cuda:0"]


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="checks the refusal a machine without the GPUs gives")
def test_a_load_of_a_gpu_split_is_refused_where_the_gpus_are_missing(deep_llama, plugins):
    with pytest.raises(loadstone.PlacementError, match="does not have"):
        loadstone.load(str(deep_llama), placement="even", max_memory=TWO_GPUS, plugins=plugins, progress=False)
