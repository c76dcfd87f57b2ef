"""bitsandbytes NF4 and int8: loadstone next to plain transformers, in one run.

    python3 bench/gpu_bnb.py OUTDIR            # GPU: the 8B Llama-shaped bf16 checkpoint onto cuda:0
    python3 bench/gpu_bnb.py OUTDIR --small    # CPU: a tiny Llama, to check the script itself

PYTHONPATH must reach loadstone (core/) and loadstone-bnb (plugins/loadstone-bnb), plus
bitsandbytes; neither needs to be pip-installed (the plugin is registered in-process when its
entry point is not installed). Every measurement runs in its own child process, so peak host RSS
and peak GPU memory are that loader's own. Writes OUTDIR/gpu_bnb.json and prints a table with
loadstone/transformers ratios.

Rows:
  transformers_bf16 / loadstone_bf16  the unquantized baseline, same placement
  transformers_*  from_pretrained(..., quantization_config=BitsAndBytesConfig(...), device_map="cuda")
  loadstone_*     loadstone.load(..., quantization=..., placement="cuda:0", trainable=False): the same
                  work as the transformers row (no training preparation), plus planning and the report
  loadstone_nf4_train  the default trainable load: adds peft's k-bit preparation, which casts the
                  bf16 embeddings, norms and lm_head to float32 (more GPU memory, by design)
The loadstone rows also record the plan's memory estimate next to the loaded model's real bytes.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

CKPT = "/tmp/llama8b-shape"  # the same path and shape as shared/anchors/gpu_load_baseline.py
SHAPE = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
             num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192)
SMALL_CKPT = "/tmp/loadstone-bench-small-llama"
MODES = ["transformers_bf16", "loadstone_bf16", "transformers_nf4", "loadstone_nf4", "transformers_int8",
         "loadstone_int8", "loadstone_nf4_train"]
PAIRS = [("bf16", "transformers_bf16", "loadstone_bf16"), ("nf4", "transformers_nf4", "loadstone_nf4"),
         ("int8", "transformers_int8", "loadstone_int8")]


def make_checkpoint(small: bool) -> str:
    import torch

    if small:
        from loadstone.testing import make_checkpoint as make_tiny

        if not os.path.exists(os.path.join(SMALL_CKPT, "config.json")):
            # hidden 256 so that the 4-bit layers dominate the bytes, as in the real model
            make_tiny("llama", SMALL_CKPT, dtype="bfloat16", hidden_size=256, intermediate_size=512,
                      max_shard_size="2MB")
        return SMALL_CKPT
    if os.path.exists(os.path.join(CKPT, "model.safetensors.index.json")):
        return CKPT
    # imported only to write it: a benchmark's process must import the model's code inside its clock
    from transformers import LlamaConfig, LlamaForCausalLM

    started = time.time()
    with torch.device("cuda"):
        model = LlamaForCausalLM(LlamaConfig(**SHAPE, dtype="bfloat16")).to(torch.bfloat16)
    model.save_pretrained(CKPT, max_shard_size="5GB")
    os.sync()  # written back before any row: a row must not share the disk with 16 GB of writeback
    del model
    torch.cuda.empty_cache()
    print(f"checkpoint written in {time.time() - started:.1f}s", flush=True)
    return CKPT


def plugin_manager():
    """The environment's plugins; loadstone-bnb added in-process when its entry point is not installed."""
    from loadstone.testing import plugins_with

    return plugins_with("nf4", "loadstone_bnb.plugin", "bnb")


def child(mode: str, ckpt: str, small: bool) -> dict:
    import torch

    cuda = not small
    if cuda:
        torch.cuda.init()
        torch.cuda.synchronize()
    # Both sides import the same libraries before the clock starts; what each imports lazily during the
    # load (the model's modeling module, bitsandbytes) is timed on both sides alike.
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    method = "int8" if mode.endswith("int8") else ("none" if mode.endswith("bf16") else "nf4")
    out: dict = {"mode": mode, "method": method}
    if mode.startswith("transformers"):
        if method == "nf4":
            config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                        bnb_4bit_compute_dtype=torch.bfloat16)
        elif method == "int8":
            config = BitsAndBytesConfig(load_in_8bit=True)
        else:  # the unquantized baseline: no quantization_config at all
            config = None
        started = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16, quantization_config=config,
                                                     device_map="cuda" if cuda else "cpu")
        if cuda:
            torch.cuda.synchronize()
        out["wall_s"] = time.perf_counter() - started
    else:
        import loadstone

        manager = plugin_manager()
        trainable = mode.endswith("_train")
        started = time.perf_counter()
        result = loadstone.load(ckpt, quantization=method, quantization_options={"double_quant": True}
                                if method == "nf4" else {}, placement="cuda:0" if cuda else "cpu", dtype="bfloat16",
                                trainable=trainable, plugins=manager, progress=False)
        if cuda:
            torch.cuda.synchronize()
        out["wall_s"] = time.perf_counter() - started
        model = result.model
        out["estimated_bytes"] = result.report.placement["estimated_bytes"]
        out["stages_s"] = {k: round(v, 3) for k, v in result.report.stages.items()}
    from loadstone_bnb import measured_bytes

    out["model_bytes"] = measured_bytes(model)
    if "estimated_bytes" in out:
        out["estimate_error_percent"] = round(100 * (out["estimated_bytes"] - out["model_bytes"]) / out["model_bytes"], 3)
    out["layers"] = sorted({type(m).__name__ for m in model.modules() if "Linear" in type(m).__name__})
    out["wall_s"] = round(out["wall_s"], 3)
    out["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)
    out["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None
    return out


def ratio(a, b) -> str:
    return f"{a / b:.2f}x" if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else "-"


def table(results: dict[str, dict]) -> str:
    lines = [f"{'mode':22} {'wall s':>8} {'RSS GiB':>8} {'GPU GiB':>8} {'model GiB':>9} {'estimate':>9}"]
    for mode in MODES:
        r = results.get(mode)
        if r is None:
            lines.append(f"{mode:22} FAILED")
            continue
        est = f"{r['estimate_error_percent']:+.2f}%" if "estimate_error_percent" in r else ""
        gpu = f"{r['peak_gpu_gib']:.2f}" if r.get("peak_gpu_gib") is not None else "-"
        lines.append(f"{mode:22} {r['wall_s']:8.2f} {r['peak_rss_gib']:8.2f} {gpu:>8} "
                     f"{r['model_bytes'] / 2**30:9.3f} {est:>9}")
    lines.append("")
    lines.append(f"{'loadstone/transformers':22} {'wall':>8} {'RSS':>8} {'GPU':>8}")
    for method, rival, ours in PAIRS:
        a, b = results.get(ours, {}), results.get(rival, {})
        lines.append(f"{method:22} {ratio(a.get('wall_s'), b.get('wall_s')):>8} "
                     f"{ratio(a.get('peak_rss_gib'), b.get('peak_rss_gib')):>8} "
                     f"{ratio(a.get('peak_gpu_gib'), b.get('peak_gpu_gib')):>8}")
    return "\n".join(lines)


def versions() -> dict:
    import importlib.metadata as md

    import torch

    found = {"python": sys.version.split()[0]}
    for dist in ("torch", "transformers", "bitsandbytes", "peft", "accelerate"):
        try:
            found[dist] = md.version(dist)
        except md.PackageNotFoundError:  # e.g. on a path without dist-info
            found[dist] = getattr(sys.modules.get(dist), "__version__", None)
    import loadstone

    found["loadstone"] = loadstone.__version__
    if torch.cuda.is_available():
        found["gpu"] = torch.cuda.get_device_name(0)
    return found


def main(outdir: str, small: bool) -> int:
    os.makedirs(outdir, exist_ok=True)
    ckpt = make_checkpoint(small)
    files = [f for f in os.listdir(ckpt) if f.endswith(".safetensors")]
    info = {"checkpoint": ckpt, "checkpoint_bytes": sum(os.path.getsize(os.path.join(ckpt, f)) for f in files),
            "small": small, "versions": versions(), "results": {}}
    print(json.dumps(info["versions"]), flush=True)
    path = os.path.join(outdir, "gpu_bnb_small.json" if small else "gpu_bnb.json")
    for mode in MODES:
        args = [sys.executable, os.path.abspath(__file__), "--child", mode, ckpt] + (["--small"] if small else [])
        done = subprocess.run(args, capture_output=True, text=True, timeout=600)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode == 0 and lines:
            info["results"][mode] = json.loads(lines[-1])
            print(lines[-1], flush=True)
        else:
            info["results"][mode] = None
            print(f"{mode} FAILED (exit {done.returncode}):\n{done.stderr[-3000:]}", flush=True)
        with open(path, "w") as fh:  # after every child, so a later crash keeps what was measured
            json.dump(info, fh, indent=1)
    print(table({k: v for k, v in info["results"].items() if v}))
    print(f"wrote {path}")
    return 0 if all(info["results"].values()) else 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2], sys.argv[3], "--small" in sys.argv[4:])), flush=True)
    elif len(sys.argv) > 1 and not sys.argv[1].startswith("-"):
        sys.exit(main(sys.argv[1], "--small" in sys.argv[2:]))
    else:
        print(__doc__, file=sys.stderr)
        sys.exit(64)
