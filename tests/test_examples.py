"""The scripts in examples/ run as documented (docs/devicemap.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.slow
def test_fsdp_qlora_example_trains_with_two_torchrun_processes(tmp_path):
    """Two processes with gloo on the CPU, NF4 base sharded by the fsdp engine, LoRA under FSDP2:
    the loss goes down and each process held half of the base model."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOADSTONE_", "RANK", "LOCAL_RANK", "WORLD_"))}
    # the tiny model goes to TMPDIR; a crash in C++ prints every thread's Python stack
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", TMPDIR=str(tmp_path), PYTHONFAULTHANDLER="1")
    report = tmp_path / "report.json"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(EXAMPLES / "fsdp_qlora.py"), "--steps", "6", "--report", str(report)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"stdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-6000:]}"
    assert "placement      fsdp" in done.stdout and "engine         fsdp" in done.stdout
    data = json.loads(report.read_text())
    losses = data["losses"]
    assert data["world"] == 2 and data["quantization"] == "nf4" and len(losses) == 6
    assert losses[-1] < losses[0] - 0.15, losses
    assert sum(b < a for a, b in zip(losses, losses[1:])) >= 4, losses
    ranks = data["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert ranks[0]["shard_bytes"] == ranks[1]["shard_bytes"] > 0
    assert all(r["load_peak_host_rss_bytes"] > 0 for r in ranks)
