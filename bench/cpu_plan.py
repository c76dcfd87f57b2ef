"""How long does planning a 70B load take, next to doing the same by hand with accelerate?

    python bench/cpu_plan.py OUTDIR

Builds a Llama-3-70B-shaped checkpoint whose safetensors files hold real headers and sparse data
(no weight bytes are ever written or read), then, each in its own child process with the
libraries imported before the clock starts:

  loadstone_plan_bf16   loadstone.plan(ckpt, placement="auto", max_memory=2 GPUs + CPU)
  loadstone_plan_nf4    the same with quantization="nf4" (needs loadstone-bnb)
  by_hand_bf16          what a user writes without loadstone: AutoConfig, the model on the meta
                        device, accelerate's get_balanced_memory + infer_auto_device_map
                        (no header validation, no quantization estimate, no report)

Writes OUTDIR/cpu_plan.json and prints the table with the loadstone/by-hand ratio. Needs no GPU:
the budget names two 80 GiB GPUs, and planning for devices this machine lacks is allowed.
"""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
import tempfile
import time

SHAPE = dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
             num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=8192)
BUDGET = {"cuda:0": "80GiB", "cuda:1": "80GiB", "cpu": "200GiB"}
MODES = ["loadstone_plan_bf16", "loadstone_plan_nf4", "by_hand_bf16"]


def make_sparse_checkpoint(folder: str, shards: int = 30) -> None:
    """Real config and safetensors headers; the data regions are holes in sparse files."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**SHAPE, dtype="bfloat16", tie_word_embeddings=False)
    config.save_pretrained(folder)
    with torch.device("meta"):
        names = [(n, tuple(t.shape)) for n, t in AutoModelForCausalLM.from_config(config).state_dict().items()]
    per_shard = math.ceil(len(names) / shards)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        header, offset = {}, 0
        for name, shape in names[i * per_shard:(i + 1) * per_shard]:
            nbytes = math.prod(shape) * 2
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = file
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with open(os.path.join(folder, file), "wb") as fh:
            fh.write(struct.pack("<Q", len(raw)) + raw)
            fh.truncate(8 + len(raw) + offset)
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {}, "weight_map": weight_map}, fh)


def child(mode: str, folder: str) -> dict:
    import torch  # noqa: F401  (imported before the clock on both sides)
    import transformers  # noqa: F401

    import loadstone

    out: dict = {"mode": mode}
    if mode.startswith("loadstone"):
        from loadstone.stages.inspect import import_transformers

        import_transformers()
        quantization = "nf4" if mode.endswith("nf4") else None
        started = time.perf_counter()
        plan = loadstone.plan(folder, quantization=quantization, placement="auto", max_memory=BUDGET)
        out["wall_s"] = time.perf_counter() - started
        out["stages_s"] = {k: round(v, 3) for k, v in plan.report.stages.items()}
        out["bytes_per_device"] = plan.bytes_per_device
    else:
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.integrations.accelerate import get_balanced_memory, infer_auto_device_map

        started = time.perf_counter()
        config = AutoConfig.from_pretrained(folder)
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        budget = get_balanced_memory(model, max_memory={0: 80 * 2**30, 1: 80 * 2**30, "cpu": 200 * 2**30},
                                     no_split_module_classes=model._no_split_modules)
        device_map = infer_auto_device_map(model, max_memory=budget, no_split_module_classes=model._no_split_modules)
        out["wall_s"] = time.perf_counter() - started
        out["devices"] = sorted({str(v) for v in device_map.values()})
    out["wall_s"] = round(out["wall_s"], 3)
    return out


def main(outdir: str) -> int:
    os.makedirs(outdir, exist_ok=True)
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        make_sparse_checkpoint(folder)
        for mode in MODES:
            done = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", mode, folder],
                                  capture_output=True, text=True, timeout=600)
            lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
            results[mode] = json.loads(lines[-1]) if done.returncode == 0 and lines else None
            print(lines[-1] if results[mode] else f"{mode} FAILED:\n{done.stderr[-2000:]}", flush=True)
    with open(os.path.join(outdir, "cpu_plan.json"), "w") as fh:
        json.dump({"shape": SHAPE, "budget": BUDGET, "results": results}, fh, indent=1)
    print(f"\n{'mode':22} {'wall s':>8}")
    for mode in MODES:
        print(f"{mode:22} {results[mode]['wall_s']:8.3f}" if results[mode] else f"{mode:22} FAILED")
    ours, rival = results.get("loadstone_plan_bf16"), results.get("by_hand_bf16")
    if ours and rival:
        print(f"loadstone/by-hand (bf16): {ours['wall_s'] / rival['wall_s']:.2f}x")
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2], sys.argv[3])), flush=True)
    elif len(sys.argv) == 2:
        sys.exit(main(sys.argv[1]))
    else:
        print(__doc__, file=sys.stderr)
        sys.exit(64)
