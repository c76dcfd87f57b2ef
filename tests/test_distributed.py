"""``placement="rank"`` under a real ``torchrun`` (two CPU processes, gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).parent / "fixtures" / "rank_worker.py"


def worker_env() -> dict[str, str]:
    """This environment without another launcher's rank variables or loadstone settings; one
    thread per process (two share the CI's two cores), and a crash prints every thread's stack."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOADSTONE_", "RANK", "LOCAL_RANK", "WORLD_"))}
    env.update(OMP_NUM_THREADS="1", LOADSTONE_PLUGINS="", PYTHONFAULTHANDLER="1")
    return env


@pytest.mark.slow
def test_rank_placement_under_torchrun(llama_lora, tmp_path):
    adapter = llama_lora
    env = worker_env()
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(WORKER), str(adapter), str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-8000:]
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank, report in enumerate(seen):
        assert report["rank"] == rank and report["world"] == 2
        assert report["placement_choice"] == "rank" and report["device_map"] == {"": "cpu"}
        reason = report["placement_reason"]
        assert f"LOCAL_RANK={rank}" in reason and f"RANK={rank}" in reason and "WORLD_SIZE=2" in reason
        assert "no CUDA device" in reason
        assert report["grads_differ"] and report["all_reduce_is_sum"] and report["same_base_weights"]
        assert "lora_B" in report["param"] and report["trainable"] > 0
    assert seen[0]["param"] == seen[1]["param"]


TEARDOWN = r"""
import glob, json, sys
import torch.distributed as dist
import loadstone

dist.init_process_group("gloo", init_method=sys.argv[2], rank=0, world_size=1)
before = "torch.distributed.nn.functional" in sys.modules
loadstone.load(sys.argv[1], progress=False)  # imports transformers, so FSDP, after the group exists
import torch.distributed.nn.functional as functional

pinned = [name for name, f in vars(functional).items()
          if any(isinstance(d, dist.ProcessGroup) for d in getattr(f, "__defaults__", None) or ())]
dist.destroy_process_group()
threads = sorted(open(p).read().strip() for p in glob.glob("/proc/self/task/*/comm"))
print(json.dumps({"imported_before": before, "pinned": pinned, "threads": threads, "proc": bool(threads)}))
"""


def test_destroy_process_group_frees_the_group_after_a_load(sharded_llama, tmp_path):
    """The first load imports transformers after init_process_group; torch.distributed.nn.functional
    (imported through FSDP) would then keep the group alive as a default argument until interpreter
    shutdown, where gloo's threads abort the process at random (loadstone.process_group)."""
    env = worker_env()
    done = subprocess.run([sys.executable, "-c", TEARDOWN, str(sharded_llama), f"file://{tmp_path}/rendezvous"],
                          env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert not seen["imported_before"]  # the case that pins the group
    assert seen["pinned"] == []
    if seen["proc"]:  # Linux: the group's worker threads ended inside destroy_process_group
        assert not [t for t in seen["threads"] if "gloo" in t], seen["threads"]
