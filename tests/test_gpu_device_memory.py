"""torch's caching allocator and a load onto a real GPU: the plan counts memory torch holds unused
as free (as transformers' ``get_max_memory`` does), and the native engine takes the tensors it
keeps there from one block instead of one cudaMalloc each. CI has no GPU; these run on the lent
GPU machine:

    python3 -m pytest -p loadstone.pytest_plugin tests/test_gpu_device_memory.py
"""

import sys
from pathlib import Path

import pytest
import torch

import loadstone
from loadstone.engines.device_memory import kept_bytes

sys.path.insert(0, str(Path(__file__).parent))  # tests/ is not a package (--import-mode=importlib)
from conftest import assert_same_weights, gpu_free_after_cleanup  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (CI has none)"),
]

GiB, MiB = 1 << 30, 1 << 20
LAYERS = 4


@pytest.fixture(scope="module")
def bf16_llama(tmp_path_factory) -> str:
    """Every matrix 2 MiB or more in bf16 (torch's large pool takes tensors above 1 MiB)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=8192, hidden_size=1024, intermediate_size=2816, num_hidden_layers=LAYERS,
                         num_attention_heads=8, num_key_value_heads=8, dtype="bfloat16")
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    folder = tmp_path_factory.mktemp("bf16") / "checkpoint"
    model.save_pretrained(folder)
    return str(folder)


def _large_tensors(model) -> list[int]:
    return [t.numel() * t.element_size() for t in model.state_dict().values()
            if t.numel() * t.element_size() > MiB]


@pytest.mark.parametrize("reader", ["pread", "instanttensor"])
def test_the_kept_tensors_come_from_one_block_of_torchs_cache(bf16_llama, reader):
    if reader == "instanttensor":
        pytest.importorskip("instanttensor")
    gpu_free_after_cleanup()  # nothing cached: every segment the load needs is a cudaMalloc it makes
    before = torch.cuda.memory_stats(0).get("segment.large_pool.allocated", 0)
    loaded = loadstone.load(bf16_llama, placement="cuda:0", progress=False, trainable=False, engine="loadstone",
                            engine_options={"reader": reader})
    segments = torch.cuda.memory_stats(0)["segment.large_pool.allocated"] - before
    large = _large_tensors(loaded.model)
    assert len(large) >= 7 * LAYERS  # the case this tests: one cudaMalloc each would be that many
    assert segments <= 2, segments  # the block, and at most one for what start_finishing creates
    # the block is what the tensors take, as torch rounds them: little is left cached unused
    unused = torch.cuda.memory_reserved(0) - torch.cuda.memory_allocated(0)
    assert unused < 8 * MiB, unused
    assert kept_bytes(large) <= torch.cuda.memory_allocated(0)
    model = loaded.model.cpu()
    del loaded
    reference = loadstone.load(bf16_llama, placement="cpu", engine="transformers", progress=False, trainable=False)
    assert_same_weights(model, reference.model)


def test_the_plan_counts_torchs_unused_cache_as_free(bf16_llama):
    free = gpu_free_after_cleanup()
    block = torch.empty(4 * GiB, dtype=torch.uint8, device="cuda:0")
    del block  # cached by torch: CUDA no longer reports it free, torch hands it out again
    assert torch.cuda.mem_get_info(0)[0] < free - 3 * GiB
    plan = loadstone.plan(bf16_llama, placement="cuda:0", engine="loadstone")
    assert plan.report.placement["budget"]["cuda:0"] >= free - 64 * MiB
    gpu_free_after_cleanup()


def test_no_block_is_reserved_where_torch_would_not_split_it(bf16_llama):
    """With ``max_split_size_mb`` torch keeps a block above that size whole: reserved, it would sit
    cached beside the tensors. The setting is read when CUDA starts, hence a process of its own."""
    import os
    import subprocess

    script = (
        "import torch, loadstone\n"
        f"loaded = loadstone.load({bf16_llama!r}, placement='cuda:0', progress=False, trainable=False,"
        " engine='loadstone', engine_options={'reader': 'pread'})\n"
        "print(torch.cuda.memory_reserved(0) - torch.cuda.memory_allocated(0))\n"
    )
    env = dict(os.environ, PYTORCH_CUDA_ALLOC_CONF="max_split_size_mb:64")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    unused = int(done.stdout.strip().splitlines()[-1])
    assert unused < 64 * MiB, unused
