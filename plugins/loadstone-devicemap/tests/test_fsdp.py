"""``placement="fsdp"`` and the ``fsdp`` engine: plans outside torchrun, the engine in one process
(a world of one: every architecture's units, ties, fusions and pre-quantized state), and two real
torchrun processes with gloo on the CPU (fsdp_worker.py): shards, identical outputs, training."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import loadstone
from loadstone_devicemap import shard_model

WORKER = Path(__file__).parent / "fsdp_worker.py"
NF4 = {"quantization": "nf4", "quantization_options": {"quant_storage": "bfloat16", "upcast": False}}


@pytest.fixture(scope="module")
def bf16_llama(tiny_checkpoint):
    return tiny_checkpoint("llama", dtype="bfloat16")


def test_a_plan_divides_each_devices_bytes_by_the_processes(bf16_llama, plugins):
    whole = loadstone.plan(str(bf16_llama), placement="cpu", plugins=plugins, **NF4)
    planned = loadstone.plan(str(bf16_llama), placement="fsdp:4", plugins=plugins, **NF4)
    assert planned.device_map == {"": "cpu"} and planned.report.placement["sharded_over"] == 4
    assert planned.bytes_per_device["cpu"] == -(-whole.bytes_per_device["cpu"] // 4)
    assert "1/4 of each tensor: sharded over 4 processes" in planned.render()
    assert planned.engine.name == "fsdp"  # the built-in engines load whole tensors: the kernel keeps them off
    assert "shards every tensor over 4 processes" in " ".join(planned.engine_problems["loadstone"])
    if not dist.is_initialized():
        assert "a load of this plan needs torchrun" in planned.report.decision("placement").reason
    # planning for GPUs from a CPU machine: budgets name them
    planned = loadstone.plan(str(bf16_llama), placement="fsdp:8", max_memory={"cuda:0": "1GiB"}, plugins=plugins, **NF4)
    assert planned.device_map == {"": 0}


def test_the_engine_says_what_it_needs(bf16_llama, plugins):
    with pytest.raises(loadstone.EngineError) as info:  # at plan time: nothing can load it as asked
        loadstone.plan(str(bf16_llama), placement="fsdp:2", quantization="nf4", plugins=plugins)
    problems = str(info.value)
    assert "quant_storage': 'bfloat16'" in problems and "'upcast': False" in problems
    assert "loadstone: it loads whole tensors" in problems
    other = loadstone.plan(str(bf16_llama), placement="cpu", plugins=plugins)
    assert other.engine_problems["fsdp"] == ["it loads sharded plans only (placement='fsdp')"]
    assert other.engine.name == "loadstone" and "passed over" not in other.report.decision("engine").reason
    with pytest.raises(loadstone.EngineError, match="shards every tensor over 2 processes"):
        loadstone.plan(str(bf16_llama), placement="fsdp:2", plugins=plugins, engine="loadstone")
    with pytest.raises(loadstone.PlacementError, match="cannot read the number of processes"):
        loadstone.plan(str(bf16_llama), placement="fsdp:0", plugins=plugins)
    with pytest.raises(loadstone.OptionError, match="does not know the source 'disk'"):
        loadstone.plan(str(bf16_llama), placement="fsdp:2", plugins=plugins, engine_options={"source": "disk"})
    planned = loadstone.plan(str(bf16_llama), placement="fsdp:2", plugins=plugins, engine_options={"source": "RANK0"})
    assert planned.engine_options == {"source": "rank0"}


@pytest.mark.skipif(dist.is_available() and dist.is_initialized(), reason="checks a process without torch.distributed")
def test_loading_outside_torchrun_is_refused_before_reading_weights(bf16_llama, plugins):
    with pytest.raises(loadstone.EngineError) as info:
        loadstone.load(str(bf16_llama), placement="fsdp", plugins=plugins, progress=False)
    assert "torchrun" in str(info.value) and "init_process_group" in str(info.value)


@pytest.fixture
def world_of_one():
    """A one-process gloo group in this process: the engine's code paths without torchrun."""
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize(("arch", "kwargs"), [
    ("llama", NF4), ("gpt2", NF4), ("qwen2_moe", NF4), ("mixtral", {}), ("gemma", {})])
def test_every_architecture_loads_the_same_model(tiny_checkpoint, plugins, world_of_one, arch, kwargs):
    checkpoint = str(tiny_checkpoint(arch, dtype="bfloat16"))
    result = loadstone.load(checkpoint, placement="fsdp", dtype="bfloat16", plugins=plugins, progress=False, **kwargs)
    reference = loadstone.load(checkpoint, placement="cpu", dtype="bfloat16", plugins=plugins, progress=False,
                               **kwargs).model
    assert result.report.engine["name"] == "fsdp"
    assert all(type(p).__name__ == "DTensor" for p in result.model.parameters())
    ids = torch.arange(12).reshape(2, 6)
    assert torch.equal(logits(result.model, ids), logits(reference, ids))
    tied = getattr(result.model, "all_tied_weights_keys", None) or {}
    for target, source in tied.items():
        assert result.model.get_parameter(target) is result.model.get_parameter(source)
    assert result.report.memory["ranks"][0]["rank"] == 0


def test_a_pre_quantized_checkpoint_streams_its_packed_state(tiny_checkpoint, plugins, world_of_one, tmp_path):
    source = str(tiny_checkpoint("llama", dtype="bfloat16"))
    saved = loadstone.load(source, placement="cpu", dtype="bfloat16", trainable=False, plugins=plugins,
                           progress=False, **NF4).model
    saved.save_pretrained(tmp_path / "nf4")
    options = {"dtype": "bfloat16", "plugins": plugins, "progress": False, "quantization_options": {"upcast": False}}
    result = loadstone.load(str(tmp_path / "nf4"), placement="fsdp", **options)
    reference = loadstone.load(str(tmp_path / "nf4"), placement="cpu", **options).model
    assert result.report.quantization.get("pre_quantized") and result.report.engine["name"] == "fsdp"
    ids = torch.arange(12).reshape(2, 6)
    assert torch.equal(logits(result.model, ids), logits(reference, ids))


def test_adapters_from_a_folder_join_the_fsdp_units(tiny_adapter, plugins, world_of_one):
    adapter = tiny_adapter("llama", checkpoint_kwargs={"dtype": "bfloat16"})
    result = loadstone.load(str(adapter), placement="fsdp", dtype="bfloat16", plugins=plugins, progress=False, **NF4)
    model = shard_model(result.model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert all(type(p).__name__ == "DTensor" for p in model.parameters())
    ids = torch.arange(12).reshape(2, 6)
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.slow
def test_two_torchrun_processes_hold_one_shard_each(tiny_checkpoint, tmp_path):
    checkpoint = tiny_checkpoint("llama", dtype="bfloat16")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOADSTONE_", "RANK", "LOCAL_RANK", "WORLD_"))}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONFAULTHANDLER="1")  # a C++ abort shows its stacks
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(WORKER), str(checkpoint), str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, f"stdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-6000:]}"
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank, report in enumerate(seen):
        assert (report["rank"], report["world"]) == (rank, 2)
        for case in ("nf4", "bf16", "nf4_rank0"):
            run = report[case]
            assert run["engine"] == "fsdp"
            assert run["options"] == {"source": "rank0" if case == "nf4_rank0" else "each"}
            assert run["dtensors"] and run["held"] * 2 == run["full"], (case, run["held"], run["full"])
            assert run["same_logits"], (case, run["max_diff"])
            assert run["losses"][-1] < run["losses"][0] - 0.1, run["losses"]
            assert run["trainable"] == ["default"]  # only LoRA weights (lora_A.default, lora_B.default)
            assert run["lora_b_shards_differ"]  # sharded, not replicated
            ranks = run["memory"]["ranks"]
            assert [r["rank"] for r in ranks] == [0, 1] and all(r["peak_host_rss_bytes"] > 0 for r in ranks)
            assert run["placement"]["sharded_over"] == 2
        # both ways of reading give the same shards, hence the same training
        assert report["nf4"]["losses"] == report["nf4_rank0"]["losses"]
    # each rank trained on its own batch, and FSDP averaged the gradients: same adapters, different losses
    assert seen[0]["nf4"]["losses"][0] != seen[1]["nf4"]["losses"][0]
