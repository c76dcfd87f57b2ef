"""On two GPUs (skipped elsewhere): even / layers:N / file maps load exactly as planned through both
engines, with the checkpoint's weights; FSDP shards under torchrun with NCCL.

    python -m pytest -q -p no:cacheprovider -m gpu plugins/loadstone-devicemap/tests/test_gpu.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import loadstone

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")]
WORKER = Path(__file__).parent / "fsdp_worker.py"


@pytest.fixture(scope="module")
def deep_llama(tiny_checkpoint):
    return tiny_checkpoint("llama", num_hidden_layers=8)


def weights(model):
    from accelerate.utils.modeling import get_state_dict_offloaded_model

    return {k: v.detach().cpu() for k, v in get_state_dict_offloaded_model(model).items()}


def devices_of(model) -> dict[str, str]:
    return {name: str(p.device) for name, p in model.named_parameters()}


@pytest.mark.parametrize("engine", ["loadstone", "transformers"])
@pytest.mark.parametrize("placement", ["even", "layers:2"])
def test_even_splits_load_as_planned(deep_llama, plugins, engine, placement):
    planned = loadstone.plan(str(deep_llama), placement=placement, plugins=plugins, engine=engine)
    assert {d for d in planned.device_map.values()} == {0, 1}
    result = loadstone.load(str(deep_llama), placement=placement, plugins=plugins, engine=engine, progress=False,
                            trainable=False)
    assert result.plan.device_map == planned.device_map and result.report.engine["name"] == engine
    on = devices_of(result.model)
    assert on["model.embed_tokens.weight"] == "cuda:0" and on["lm_head.weight"] == "cuda:1"
    reference = loadstone.load(str(deep_llama), placement="cpu", plugins=plugins, progress=False, trainable=False)
    ours, theirs = weights(result.model), weights(reference.model)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    ids = torch.arange(12).reshape(2, 6).to("cuda:0")
    with torch.no_grad():
        assert torch.isfinite(result.model(input_ids=ids).logits).all()


@pytest.mark.parametrize("engine", ["loadstone", "transformers"])
def test_nf4_even_split_on_two_gpus(deep_llama, plugins, engine):
    result = loadstone.load(str(deep_llama), placement="even", quantization="nf4", plugins=plugins, engine=engine,
                            progress=False, trainable=False)
    assert result.report.engine["name"] == engine
    per_device = result.plan.bytes_per_device
    assert set(per_device) == {"cuda:0", "cuda:1"}
    ids = torch.arange(12).reshape(2, 6).to("cuda:0")
    with torch.no_grad():
        assert torch.isfinite(result.model(input_ids=ids).logits).all()


@pytest.mark.parametrize("engine", ["loadstone", "transformers"])
def test_a_file_map_over_two_gpus(deep_llama, plugins, engine, tmp_path):
    rules = tmp_path / "map.yaml"
    rules.write_text("model.embed_tokens: cuda:1\nmodel.layers.[0-2]: cuda:1\nmodel.layers.[3-7]: cuda:0\n"
                     "model.norm: cuda:0\nmodel.rotary_emb: cuda:0\nlm_head: cuda:0\n")
    result = loadstone.load(str(deep_llama), placement=f"file:{rules}", plugins=plugins, engine=engine,
                            progress=False, trainable=False)
    on = devices_of(result.model)
    assert on["model.embed_tokens.weight"] == "cuda:1" and on["model.layers.3.mlp.up_proj.weight"] == "cuda:0"
    ids = torch.arange(12).reshape(2, 6).to("cuda:1")
    with torch.no_grad():
        assert torch.isfinite(result.model(input_ids=ids).logits).all()


def test_fsdp_shards_with_nccl(tiny_checkpoint, tmp_path):
    checkpoint = tiny_checkpoint("llama", dtype="bfloat16")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOADSTONE_", "RANK", "LOCAL_RANK", "WORLD_"))}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(WORKER), str(checkpoint), str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    for rank in (0, 1):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for case in ("nf4", "bf16", "nf4_rank0"):
            run = report[case]
            assert run["dtensors"] and run["held"] * 2 == run["full"]
            # GPU kernels are deterministic for identical weights and inputs; allow bf16 rounding anyway
            assert run["same_logits"] or run["max_diff"] < 1e-2, (case, run["max_diff"])
            assert run["losses"][-1] < run["losses"][0]
            devices = run["memory"]["ranks"][rank]["peak_device_bytes"]
            assert f"cuda:{rank}" in devices
