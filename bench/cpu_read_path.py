"""What reading without a memory map costs on the CPU (docs/validation.md, "Checkpoint files that change").

    python bench/cpu_read_path.py OUTDIR [--repeat N]

Builds a 1 GB float32 Llama-shaped checkpoint (12 layers, hidden 1024, 200 MB shards; reused in
OUTDIR/checkpoint), then loads it onto the CPU, each load in its own child process with the
libraries imported before the clock starts:

  transformers_mmap     from_pretrained(device_map="cpu"): transformers' default memory map (the
                        model's weights stay the file's pages until written)
  loadstone_transformers loadstone.load(engine="transformers"): the same from_pretrained, reading
                        through loadstone's pread reader (safetensors' pread backend for keys and slices)
  loadstone_native      loadstone.load(engine="loadstone"): loadstone's own pread reader

Each child first loads a tiny checkpoint the same way (lazy imports, first calls), then records the
load's wall time, the first forward's time (a memory map defers reading to it) and peak host RSS
(ru_maxrss, the process's whole life). Writes OUTDIR/cpu_read_path.json and prints the table.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

SHAPE = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=12, num_attention_heads=16,
             num_key_value_heads=4, vocab_size=32000)
MODES = ["transformers_mmap", "loadstone_transformers", "loadstone_native"]

_CHILD = r"""
import json, resource, sys, time
import torch, transformers, loadstone
mode, folder, warmup = sys.argv[1], sys.argv[2], sys.argv[3]

def load(path):
    if mode == "transformers_mmap":
        return transformers.AutoModelForCausalLM.from_pretrained(path, device_map="cpu")
    engine = "transformers" if mode == "loadstone_transformers" else "loadstone"
    return loadstone.load(path, placement="cpu", engine=engine, trainable=False, progress=False).model

def forward(model):
    with torch.no_grad():
        model(torch.arange(16).reshape(1, 16))

forward(load(warmup))  # lazy imports and first-call costs, outside the clock
start = time.perf_counter()
model = load(folder)
loaded = time.perf_counter()
forward(model)
done = time.perf_counter()
print(json.dumps({"mode": mode, "load_s": loaded - start, "first_forward_s": done - loaded,
                  "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


def main() -> None:
    outdir = sys.argv[1]
    repeat = int(sys.argv[sys.argv.index("--repeat") + 1]) if "--repeat" in sys.argv else 3
    folder, warmup = os.path.join(outdir, "checkpoint"), os.path.join(outdir, "warmup")
    if not os.path.exists(os.path.join(folder, "config.json")):
        from loadstone.testing import make_checkpoint

        make_checkpoint("llama", folder, max_shard_size="200MB", **SHAPE)
        make_checkpoint("llama", warmup)
    rows = []
    for _ in range(repeat):
        for mode in MODES:
            done = subprocess.run([sys.executable, "-c", _CHILD, mode, folder, warmup], capture_output=True,
                                  text=True, check=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".safetensors"))
    with open(os.path.join(outdir, "cpu_read_path.json"), "w") as fh:
        json.dump({"checkpoint_bytes": size, "rows": rows}, fh, indent=2)
    print(f"checkpoint: {size / 1e9:.2f} GB")
    print(f"{'mode':24} {'load s':>8} {'1st fwd s':>10} {'peak RSS GiB':>13}")
    for row in rows:
        print(f"{row['mode']:24} {row['load_s']:8.2f} {row['first_forward_s']:10.2f} {row['peak_rss_gib']:13.2f}")


if __name__ == "__main__":
    main()
