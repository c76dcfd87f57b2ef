"""``placement="rank"`` under a real ``torchrun`` (two CPU processes, gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).parent / "fixtures" / "rank_worker.py"


@pytest.mark.slow
def test_rank_placement_under_torchrun(llama_lora, tmp_path):
    adapter = llama_lora
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOADSTONE_", "RANK", "LOCAL_RANK", "WORLD_"))}
    env.update(OMP_NUM_THREADS="1", LOADSTONE_PLUGINS="")
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(WORKER), str(adapter), str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
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
