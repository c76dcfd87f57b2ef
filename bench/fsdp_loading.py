"""FSDP loading: where each process's bytes come from, and what it costs in host and GPU memory.

    python3 bench/fsdp_loading.py OUTDIR [--nproc N] [--size small|medium|large] [--checkpoint-only]

Builds a Llama-shaped bf16 checkpoint, then for each row starts ``torchrun --nproc-per-node N``
(NCCL on GPUs, gloo on the CPU) and loads it in every process:

  fsdp_each    placement="fsdp", engine "fsdp": every process reads the checkpoint itself (pread)
  fsdp_rank0   the same engine with engine_options={"source": "rank0"}: process 0 reads, broadcasts
  rank_full    placement="rank": one full copy per process (what DDP does), for contrast

each as bf16 and as NF4 (quant_storage=bfloat16). Every process records its RSS before the load,
its peak RSS during it (sampled every 5 ms), the peak GPU memory, the bytes of parameters it
holds afterwards, and the median wall time of three loads (after a warm-up load of a tiny model,
so that imports and one-time setup are not counted). Writes OUTDIR/fsdp_loading.json and prints a table.
PYTHONPATH (or an install) must reach loadstone, loadstone-bnb and loadstone-devicemap.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

SIZES = {  # Llama shapes; bf16 bytes roughly 0.26 GB, 2.2 GB, 16 GB
    "small": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                  num_key_value_heads=8, vocab_size=16000),
    "medium": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16,
                   num_key_value_heads=8, vocab_size=32000),
    "large": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=8, vocab_size=128256),
}
REPEATS = 3
ROWS = [(mode, quant) for quant in ("bf16", "nf4") for mode in ("fsdp_each", "fsdp_rank0", "rank_full")]


def checkpoint(size: str) -> str:
    folder = os.path.join(tempfile.gettempdir(), f"loadstone-bench-fsdp-{size}")
    if not os.path.exists(os.path.join(folder, "config.json")):
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        device = "cuda" if torch.cuda.is_available() else "cpu"
        with torch.device(device):
            model = LlamaForCausalLM(LlamaConfig(**SIZES[size], tie_word_embeddings=False)).to(torch.bfloat16)
        model.save_pretrained(folder, max_shard_size="2GB")
    return folder


def worker(folder: str, mode: str, quant: str, out: str) -> None:
    import faulthandler

    faulthandler.enable(all_threads=True)  # a native crash prints every thread's Python stack
    import gc
    import threading

    import torch
    import torch.distributed as dist

    import loadstone

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo")

    plugins = loadstone.PluginManager()
    kwargs = {"quantization": "nf4", "quantization_options": {"quant_storage": "bfloat16", "upcast": False}} \
        if quant == "nf4" else {}
    placement = "rank" if mode == "rank_full" else "fsdp"
    engine_options = {"source": "rank0" if mode == "fsdp_rank0" else "each"} if placement == "fsdp" else {}

    def rss() -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    peak, stop = [rss()], threading.Event()

    def sample() -> None:
        while not stop.wait(0.005):
            peak[0] = max(peak[0], rss())

    # Warm up: the same load of a tiny model first, so that imports (modeling code, bitsandbytes,
    # FSDP) and one-time allocations are not counted as the load's memory.
    tiny = os.path.join(tempfile.gettempdir(), "loadstone-bench-fsdp-warmup")
    if dist.get_rank() == 0 and not os.path.exists(os.path.join(tiny, "config.json")):
        from loadstone.testing import make_checkpoint

        make_checkpoint("llama", tiny, dtype="bfloat16")
    dist.barrier()
    loadstone.load(tiny, placement=placement, engine_options=engine_options, dtype="bfloat16", trainable=False, progress=False,
                   plugins=plugins, **kwargs)
    gc.collect()
    dist.barrier()
    before = rss()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    result = loadstone.load(folder, placement=placement, engine_options=engine_options, dtype="bfloat16", trainable=False,
                            progress=False, plugins=plugins, **kwargs)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    stop.set()
    sampler.join()
    from torch.distributed.tensor import DTensor

    held = sum((p.to_local() if isinstance(p, DTensor) else p).numel() * p.element_size()
               for p in result.model.parameters())
    engine_name = result.report.engine["name"]
    del result
    timings = [seconds]
    for _ in range(REPEATS - 1):  # the time is the median of REPEATS loads; memory is the first one's
        gc.collect()
        dist.barrier()
        started = time.perf_counter()
        again = loadstone.load(folder, placement=placement, engine_options=engine_options, dtype="bfloat16", trainable=False,
                               progress=False, plugins=plugins, **kwargs)
        if cuda:
            torch.cuda.synchronize()
        timings.append(time.perf_counter() - started)
        del again
    seconds = sorted(timings)[len(timings) // 2]
    mine = {"rank": dist.get_rank(), "seconds": round(seconds, 3), "timings": [round(t, 3) for t in timings],
            "rss_before": before,
            "peak_rss_growth": peak[0] - before, "peak_rss": peak[0], "held_bytes": held,
            "peak_gpu_bytes": int(torch.cuda.max_memory_allocated()) if cuda else None,
            "engine": engine_name}
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    if dist.get_rank() == 0:
        with open(out, "w") as fh:
            json.dump(everyone, fh)
    dist.barrier()  # nobody tears its connections down while a peer still uses them
    dist.destroy_process_group()


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("outdir")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--checkpoint-only", action="store_true", help="build the checkpoint, print its folder, exit")
    args = parser.parse_args()
    import torch

    folder = checkpoint(args.size)
    if args.checkpoint_only:
        print(folder)
        return
    os.makedirs(args.outdir, exist_ok=True)
    checkpoint_bytes = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)
                           if f.endswith(".safetensors"))
    rows = []
    for mode, quant in ROWS:
        out = os.path.join(args.outdir, f"fsdp_{mode}_{quant}.ranks.json")
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "4")}
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                               str(args.nproc), __file__, "--worker", folder, mode, quant, out],
                              env=env, capture_output=True, text=True)
        if done.returncode != 0:
            log = os.path.join(args.outdir, f"fsdp_{mode}_{quant}.failed.log")
            with open(log, "w") as fh:
                fh.write(done.stdout + done.stderr)
            raise SystemExit(f"row {mode} {quant} failed: see {log}")
        with open(out) as fh:
            ranks = json.load(fh)
        os.remove(out)
        rows.append({"mode": mode, "quantization": quant, "ranks": ranks})
        worst = max(ranks, key=lambda r: r["peak_rss_growth"])
        gpu = max((r["peak_gpu_bytes"] or 0) for r in ranks)
        print(f"{mode:11s} {quant:5s} {max(r['seconds'] for r in ranks):7.2f} s  peak RSS growth "
              f"{worst['peak_rss_growth'] / 2**20:8.1f} MiB  peak GPU {gpu / 2**20:8.1f} MiB  holds "
              f"{ranks[0]['held_bytes'] / 2**20:8.1f} MiB per process", flush=True)
    result = {"checkpoint": {"size": args.size, "shape": SIZES[args.size], "bytes": checkpoint_bytes},
              "nproc": args.nproc, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "rows": rows}
    with open(os.path.join(args.outdir, "fsdp_loading.json"), "w") as fh:
        json.dump(result, fh, indent=2)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(*sys.argv[2:6])
    else:
        main()
