"""Placement on a real CUDA device. CI has no GPU; these run on the lent GPU machine.

    python3 -m pytest tests/test_gpu.py -m gpu
"""

import pytest
import torch

import loadstone

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (CI has none)"),
]


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key].cpu(), sb[key].cpu()), key


@pytest.mark.parametrize("placement", ["cuda:0", "auto", "rank"])
def test_whole_model_on_gpu_equals_from_pretrained(tiny_checkpoint, placement):
    from transformers import AutoModelForCausalLM

    folder = tiny_checkpoint("qwen2", dtype="bfloat16", max_shard_size="100KB")
    result = loadstone.load(str(folder), placement=placement, progress=False, trainable=False)
    assert {p.device.type for p in result.model.parameters()} == {"cuda"}
    assert result.report.memory["peak_device_bytes"]["cuda:0"] > 0
    # auto balances over every visible GPU, as transformers' device_map="auto" does: same map
    reference = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16,
                                                     device_map="auto" if placement == "auto" else "cuda:0")
    expected = getattr(reference, "hf_device_map", None) or {"": 0}  # single-device loads set no hf_device_map
    assert result.plan.device_map == {k: (int(v[5:]) if str(v).startswith("cuda:") else v) for k, v in expected.items()}
    _same_state(result.model, reference)


def test_budget_splits_gpu_and_cpu_and_plan_equals_load(tiny_checkpoint):
    folder = tiny_checkpoint("llama")
    # accelerate keeps room for the largest layer (~150 KB here) on the GPU: 400 KB holds the
    # embeddings and one decoder layer, the rest goes to the CPU
    budget = {"cuda:0": "400KB", "cpu": "10GiB"}
    plan = loadstone.plan(str(folder), max_memory=budget)
    result = loadstone.load(str(folder), max_memory=budget, progress=False, trainable=False)
    assert plan.device_map == result.plan.device_map
    assert set(plan.device_map.values()) == {0, "cpu"}
    assert result.model.hf_device_map == plan.device_map
    for name, param in result.model.named_parameters():
        key = max((k for k in plan.device_map if k == "" or name == k or name.startswith(k + ".")), key=len)
        want = plan.device_map[key]
        # accelerate keeps CPU-offloaded weights in a hook's weights map and leaves meta tensors behind
        assert param.device.type in (("cuda",) if want == 0 else ("cpu", "meta")), name


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_qlora_rank_placement_under_torchrun_with_nccl(tiny_adapter, tmp_path):
    """The DDP QLoRA layout: one NF4 copy per process on cuda:$LOCAL_RANK, gradients all-reduced."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    adapter = tiny_adapter("llama", checkpoint_kwargs={"dtype": "bfloat16"})
    worker = Path(__file__).parent / "fixtures" / "rank_worker.py"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "LOCAL_RANK", "WORLD_"))}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(worker), str(adapter), str(tmp_path), "nccl", "nf4"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):
        seen = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert seen["device_map"] == {"": str(rank)} and seen["device"] == f"cuda:{rank}"
        assert f"-> cuda:{rank}" in seen["placement_reason"]
        assert seen["grads_differ"] and seen["all_reduce_is_sum"] and seen["same_base_weights"]


CONTEXTS_AFTER_A_LOAD = r"""
import torch
import loadstone

loadstone.load({checkpoint!r}, placement={placement!r}, progress=False)
print([i for i in range(torch.cuda.device_count()) if torch._C._cuda_hasPrimaryContext(i)])
"""


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("placement, env", [("cuda:1", {}), ("rank", {"LOCAL_RANK": "1"})])
def test_a_load_onto_one_gpu_creates_no_context_on_the_others(tiny_checkpoint, python_subprocess, placement, env):
    """One rank of eight must not leave a CUDA context (hundreds of MiB) on the seven other GPUs:
    the plan's memory check asks only the devices of its map."""
    code = CONTEXTS_AFTER_A_LOAD.format(checkpoint=str(tiny_checkpoint("llama")), placement=placement)
    done = python_subprocess(code, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[1]"


@pytest.mark.parametrize("arch", ["llama", "gpt2", "mixtral", "qwen2_moe", "gemma"])
def test_native_engine_on_gpu_equals_the_transformers_engine(tiny_checkpoint, arch):
    folder = tiny_checkpoint(arch, dtype="float32")
    for dtype in ("bfloat16", "float32"):
        native = loadstone.load(str(folder), placement="cuda:0", dtype=dtype, engine="loadstone", progress=False,
                                trainable=False)
        reference = loadstone.load(str(folder), placement="cuda:0", dtype=dtype, engine="transformers",
                                   progress=False, trainable=False)
        assert native.report.engine["name"] == "loadstone"
        _same_state(native.model, reference.model)
        buffers = dict(reference.model.named_buffers())
        for name, buffer in native.model.named_buffers():
            assert torch.equal(buffer, buffers[name]), name


@pytest.mark.parametrize("options", [{"reader": "pread"}, {"reader": "pread", "readers": 2, "chunk_bytes": "1MiB"},
                                     {"reader": "instanttensor"},
                                     {"reader": "instanttensor", "readers": 4, "chunk_bytes": "1MiB"}])
def test_every_gpu_reader_gives_the_same_model(tiny_checkpoint, options):
    if options["reader"] == "instanttensor":
        pytest.importorskip("instanttensor")
    folder = str(tiny_checkpoint("llama", dtype="bfloat16", max_shard_size="2MB"))
    loaded = loadstone.load(folder, placement="cuda:0", engine_options=options, progress=False, trainable=False)
    assert loaded.plan.engine_options["reader"] == options["reader"]
    reference = loadstone.load(folder, placement="cuda:0", engine="transformers", progress=False, trainable=False)
    _same_state(loaded.model, reference.model)


def test_instanttensor_reads_in_flight_that_overflow_its_ring_are_refused_at_plan_time(tiny_checkpoint):
    pytest.importorskip("instanttensor")
    folder = str(tiny_checkpoint("llama", dtype="bfloat16"))
    with pytest.raises(loadstone.OptionError) as info:
        loadstone.plan(folder, placement="cuda:0", engine_options={"reader": "instanttensor", "readers": 64,
                                                                   "chunk_bytes": "64MiB"})
    assert info.value.field == "engine option readers" and "ring buffer" in str(info.value)


def test_native_engine_streams_a_map_over_gpu_and_cpu(tiny_checkpoint):
    folder = tiny_checkpoint("llama")
    budget = {"cuda:0": "400KB", "cpu": "10GiB"}
    native = loadstone.load(str(folder), max_memory=budget, engine="loadstone", progress=False, trainable=False)
    reference = loadstone.load(str(folder), max_memory=budget, engine="transformers", progress=False, trainable=False)
    assert native.plan.device_map == reference.plan.device_map and set(native.plan.device_map.values()) == {0, "cpu"}
    ids = torch.arange(12, device="cuda").reshape(1, 12)
    with torch.no_grad():
        assert torch.equal(native.model(ids).logits, reference.model(ids).logits)


def test_gpu_and_disk_offload_through_transformers_reads_without_mmap_and_cleans_up(tiny_checkpoint, tmp_path):
    """The transformers engine (pread backend) with layers on the GPU and on disk: the forward equals
    a CPU load's, the load's own offload folder holds the re-saved experts and goes with the model."""
    import gc
    import os

    folder = str(tiny_checkpoint("mixtral"))
    on_gpu_and_disk = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": "disk", "model.norm": 0,
                       "model.rotary_emb": 0, "lm_head": 0}
    loaded = loadstone.load(folder, placement=on_gpu_and_disk, offload_folder=str(tmp_path / "off"), progress=False,
                            trainable=False)
    workspace = loaded.report.placement["offload_workspace"]
    assert loaded.report.engine["name"] == "transformers"
    assert any(name.endswith(".safetensors") for name in os.listdir(workspace))
    reference = loadstone.load(folder, placement="cpu", progress=False, trainable=False).model
    ids = torch.arange(12).reshape(1, 12)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids.to("cuda:0")).logits.cpu(), reference(ids).logits,
                                   rtol=1e-4, atol=1e-4)
    del loaded
    gc.collect()
    assert not (tmp_path / "off").exists()


def test_the_transformers_engine_reads_through_pinned_memory_and_gives_it_back(tiny_checkpoint):
    """The GPU-bound tensors pass through torch's caching host allocator (pinned blocks handed
    out), none of its blocks is kept after the load, and the model equals the native engine's."""
    folder = str(tiny_checkpoint("llama", dtype="bfloat16", max_shard_size="2MB"))
    torch.cuda.init()
    before = torch.cuda.host_memory_stats()
    loaded = loadstone.load(folder, placement="cuda:0", engine="transformers", progress=False, trainable=False)
    after = torch.cuda.host_memory_stats()
    assert after["num_host_alloc"] > before.get("num_host_alloc", 0)
    assert after["allocated_bytes.current"] == 0, after
    native = loadstone.load(folder, placement="cuda:0", engine="loadstone", progress=False, trainable=False)
    _same_state(loaded.model, native.model)
