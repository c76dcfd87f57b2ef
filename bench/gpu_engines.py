"""Engines side by side: plain transformers, loadstone's transformers engine, loadstone's native
streaming engine, and raw-tensor readers, in one run, each load in its own process.

    python3 bench/gpu_engines.py OUTDIR [--rows ROW,ROW...] [--cpu | --small] [--repeat N]

GPU (default): the 8B Llama-shaped bf16 checkpoint of shared/anchors (4 shards, 16.06 GB) onto
cuda:0. ``--cpu``: a 1.5 GB Llama-shaped bf16 checkpoint (2 shards) onto the CPU, the rows that
make sense there. ``--small``: a tiny Llama on the CPU, to check the script anywhere. PYTHONPATH must reach
loadstone (core/) and loadstone-bnb (plugins/loadstone-bnb) plus bitsandbytes (and instanttensor
for its rows); nothing needs to be pip-installed.

Every row imports the same libraries before its clock starts (torch, transformers, bitsandbytes,
loadstone, loadstone_bnb; CUDA initialised), except the ``e2e_*`` rows, whose clock starts before
the first import of a fresh process (imports included). The ``*_preimport`` rows also import the
checkpoint's model classes (transformers' Llama modules) before the clock, which the other rows'
loads import inside it; their ratio is against ``transformers_bf16_preimport``. Each row records wall time, GB/s (the
checkpoint's bytes over wall time), peak host RSS of the process (``VmHWM``: ``ru_maxrss`` would
carry the parent's peak over the exec), peak GPU memory twice: torch's allocator
(``torch.cuda.max_memory_allocated``: ``peak_gpu_gib``) and the device's (``peak_gpu_device_gib``:
the most ``cudaMemGetInfo`` showed used, sampled every 2 ms, less what was used before the clock;
it counts what torch's allocator does not: instanttensor's ring buffers, the allocator's cache,
kernels loaded) and, for loadstone rows, the report's stage times and
engine. ``cold_*`` rows drop the page cache first (root and a writable drop_caches needed; they
are skipped, and say so, where that fails). On the CPU every row sums every weight inside its clock:
``from_pretrained`` memory-maps the files and would otherwise read the weights only at the first
forward. Writes OUTDIR/gpu_engines.json (``cpu_engines.json`` with ``--cpu``) and prints the table
with ratios against ``transformers_bf16`` / ``transformers_nf4`` / ``transformers_int8``.
``--repeat N`` runs every row N times, in N interleaved rounds (so drift on a shared machine hits
every row alike), and keeps the run with the median wall time, with every run's wall time in
``wall_s_runs`` (and, for loadstone rows, every run's stages, engine timings and notes in
``stages_runs``, ``engine_timings_runs``, ``notes_runs``).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time

T_PROCESS = time.perf_counter()  # e2e rows: before any import of this process

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_bnb import CKPT, make_checkpoint  # noqa: E402  (the same checkpoint as the other benchmarks)
from measure import (  # noqa: E402
    ABLATIONS,
    DevicePeak,
    compile_sources,
    drop_page_cache,
    files_of,
    import_model_code,
    peak_rss_bytes,
    warm_page_cache,
)

ROWS = {
    # name: (kind, method, engine)
    "transformers_bf16": ("transformers", "bf16", None),
    "loadstone_transformers_bf16": ("loadstone", "bf16", "transformers"),
    "loadstone_native_bf16": ("loadstone", "bf16", "loadstone"),
    "loadstone_native_bf16_pread": ("loadstone", "bf16", "loadstone:reader=pread"),
    "loadstone_native_bf16_mmap": ("loadstone", "bf16", "loadstone:reader=mmap"),
    "loadstone_native_nf4_pread": ("loadstone", "nf4", "loadstone:reader=pread"),
    "loadstone_native_bf16_r12": ("loadstone", "bf16", "loadstone:reader=pread,readers=12"),
    "loadstone_native_bf16_c16": ("loadstone", "bf16", "loadstone:reader=pread,chunk_bytes=16MiB"),
    "loadstone_native_bf16_r16": ("loadstone", "bf16", "loadstone:reader=pread,readers=16"),
    "loadstone_native_bf16_c4": ("loadstone", "bf16", "loadstone:reader=instanttensor,chunk_bytes=4MiB"),
    "loadstone_native_bf16_c8": ("loadstone", "bf16", "loadstone:reader=instanttensor,chunk_bytes=8MiB"),
    "loadstone_native_bf16_it16": ("loadstone", "bf16", "loadstone:reader=instanttensor,readers=16"),
    # fewer pinned host bytes for instanttensor to allocate before its first read (48 MiB by default)
    "loadstone_native_bf16_c2": ("loadstone", "bf16", "loadstone:reader=instanttensor,chunk_bytes=2MiB"),
    "loadstone_native_bf16_it8": ("loadstone", "bf16", "loadstone:reader=instanttensor,readers=8"),
    "loadstone_native_bf16_c2_it16": ("loadstone", "bf16",
                                      "loadstone:reader=instanttensor,chunk_bytes=2MiB,readers=16"),
    "loadstone_native_nf4_c4": ("loadstone", "nf4", "loadstone:reader=instanttensor,chunk_bytes=4MiB"),
    "loadstone_native_nf4_d8": ("loadstone", "nf4", "loadstone:reader=instanttensor,readers=8"),
    "loadstone_native_bf16_noahead": ("loadstone", "bf16", "loadstone:read_ahead=off"),
    "loadstone_native_nf4_noahead": ("loadstone", "nf4", "loadstone:read_ahead=off"),
    "loadstone_native_int8_noahead": ("loadstone", "int8", "loadstone:read_ahead=off"),
    "loadstone_native_int8_pread": ("loadstone", "int8", "loadstone:reader=pread"),
    "loadstone_native_nf4_pread_if0": ("loadstone", "nf4", "loadstone:reader=pread,in_flight=0"),
    "loadstone_native_int8_pread_if0": ("loadstone", "int8", "loadstone:reader=pread,in_flight=0"),
    "loadstone_native_nf4_pread_if1g": ("loadstone", "nf4", "loadstone:reader=pread,in_flight=1GiB"),
    "loadstone_native_nf4_pread_if64m": ("loadstone", "nf4", "loadstone:reader=pread,in_flight=64MiB"),
    # max_memory is the load's own argument, not an engine option: the device budget the plan keeps
    "loadstone_native_nf4_budget56": ("loadstone", "nf4", "loadstone:max_memory=5.6GiB"),
    "loadstone_native_bf16_ahead16": ("loadstone", "bf16", "loadstone:read_ahead=16GiB"),
    "loadstone_transformers_bf16_mmap": ("loadstone", "bf16", "transformers:reader=mmap"),
    "loadstone_transformers_nf4_mmap": ("loadstone", "nf4", "transformers:reader=mmap"),
    "instanttensor_buffered": ("raw", "instanttensor", None),
    "instanttensor_buffered_c4": ("raw", "instanttensor", 4 << 20),  # loadstone's 4 MiB reads
    "loadstone_native_bf16_r8": ("loadstone", "bf16", "loadstone:readers=8"),  # fewer reads in flight beside the plan
    # an ablation, not an option: the native engine without its one-block reservation in torch's cache
    "loadstone_native_bf16_noreserve": ("loadstone", "bf16", "loadstone:ablate=reserve"),
    # not a load to compare: the engine starts 0.5 s late (inside the weights stage), after the
    # read-ahead has read everything, so that engine_timings.stream is what emptying a full ring costs
    "loadstone_native_bf16_lateplan": ("loadstone", "bf16", "loadstone:ablate=late_plan"),
    # the model's own modules (transformers' Llama code) imported before the clock as well, as a
    # program that imports its model class has them: the load without transformers' import time
    "loadstone_native_bf16_preimport": ("loadstone", "bf16", "loadstone"),
    "instanttensor_buffered_preimport": ("raw", "instanttensor", None),
    "transformers_bf16_preimport": ("transformers", "bf16", None),
    # an ablation: the one-block reservation made before the read-ahead starts, not beside its reads
    "loadstone_native_bf16_earlyreserve": ("loadstone", "bf16", "loadstone:ablate=early_reserve"),
    "loadstone_native_bf16_earlyreserve_preimport": ("loadstone", "bf16", "loadstone:ablate=early_reserve"),
    "safetensors_load_file": ("raw", "safetensors", None),
    "fastsafetensors": ("raw", "fastsafetensors", None),
    "transformers_fp32": ("transformers", "fp32", None),  # the bf16 checkpoint cast to float32 on load
    "loadstone_native_fp32": ("loadstone", "fp32", "loadstone"),
    "transformers_nf4": ("transformers", "nf4", None),
    "loadstone_native_nf4": ("loadstone", "nf4", "loadstone"),
    "loadstone_transformers_nf4": ("loadstone", "nf4", "transformers"),
    "transformers_int8": ("transformers", "int8", None),
    "loadstone_native_int8": ("loadstone", "int8", "loadstone"),
    "e2e_transformers_bf16": ("transformers", "bf16", None),
    "e2e_loadstone_bf16": ("loadstone", "bf16", "loadstone"),
    "e2e_transformers_nf4": ("transformers", "nf4", None),
    "e2e_loadstone_nf4": ("loadstone", "nf4", "loadstone"),
    "cold_disk_read": ("raw", "disk", None),
    "cold_transformers_bf16": ("transformers", "bf16", None),
    "cold_loadstone_native_bf16": ("loadstone", "bf16", "loadstone"),
    "cold_loadstone_native_bf16_noahead": ("loadstone", "bf16", "loadstone:read_ahead=off"),
    "cold_loadstone_native_bf16_buffered": ("loadstone", "bf16", "loadstone:io=buffered"),
    "cold_loadstone_native_bf16_d64": ("loadstone", "bf16", "loadstone:io=direct,readers=64"),
    "e2e_loadstone_bf16_mmap": ("loadstone", "bf16", "loadstone:reader=mmap"),
    "e2e_loadstone_bf16_pread": ("loadstone", "bf16", "loadstone:reader=pread"),
    "cold_loadstone_native_bf16_mmap": ("loadstone", "bf16", "loadstone:reader=mmap"),
}
# the rows a plain run measures (the others are tuning variants: --rows picks any)
DEFAULT_ROWS = ["transformers_bf16", "loadstone_transformers_bf16", "loadstone_native_bf16", "loadstone_native_bf16_pread",
                "instanttensor_buffered", "safetensors_load_file", "fastsafetensors", "transformers_nf4", "loadstone_native_nf4",
                "loadstone_native_nf4_pread", "loadstone_transformers_nf4", "transformers_int8", "loadstone_native_int8",
                "e2e_transformers_bf16", "e2e_loadstone_bf16", "e2e_transformers_nf4", "e2e_loadstone_nf4",
                "cold_disk_read", "cold_transformers_bf16", "cold_loadstone_native_bf16"]
BASELINE = {"bf16": "transformers_bf16", "nf4": "transformers_nf4", "int8": "transformers_int8",
            "fp32": "transformers_fp32"}
SMALL_CKPT = "/tmp/loadstone-bench-engines-small"
CPU_CKPT = "/tmp/loadstone-bench-engines-cpu"
CPU_SHAPE = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=12,
                 num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=2048)
CPU_ROWS = ["transformers_bf16", "loadstone_transformers_bf16", "loadstone_native_bf16", "loadstone_native_bf16_pread",
            "safetensors_load_file", "fastsafetensors", "transformers_fp32", "loadstone_native_fp32",
            "transformers_nf4", "loadstone_native_nf4", "loadstone_transformers_nf4",
            "e2e_transformers_bf16", "e2e_loadstone_bf16", "e2e_loadstone_bf16_pread", "cold_disk_read",
            "cold_transformers_bf16", "cold_loadstone_native_bf16", "cold_loadstone_native_bf16_mmap"]


def small_checkpoint() -> str:
    from loadstone.testing import make_checkpoint as make_tiny

    if not os.path.exists(os.path.join(SMALL_CKPT, "config.json")):
        make_tiny("llama", SMALL_CKPT, dtype="bfloat16", hidden_size=256, intermediate_size=512, max_shard_size="2MB")
    return SMALL_CKPT


def cpu_checkpoint() -> str:
    """1.5 GB of bf16 weights: big enough that reading, not Python, decides the time."""
    if not os.path.exists(os.path.join(CPU_CKPT, "model.safetensors.index.json")):
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**CPU_SHAPE, dtype="bfloat16")).to(torch.bfloat16)
        model.save_pretrained(CPU_CKPT, max_shard_size="800MB")
    return CPU_CKPT


def child(row: str, ckpt: str, device: str) -> dict:
    kind, method, engine = ROWS[row]
    e2e = row.startswith("e2e_")
    if not e2e:  # the same libraries on every row, before the clock
        import bitsandbytes  # noqa: F401
        import torch
        import transformers  # noqa: F401

        import loadstone  # noqa: F401
        import loadstone_bnb  # noqa: F401
        from loadstone.stages.inspect import import_transformers

        import_transformers()
        if row.endswith("_preimport"):
            import_model_code(ckpt)
        if device.startswith("cuda"):
            torch.cuda.init()
            torch.empty(1, device=device)
            torch.cuda.synchronize()
    # what the process holds before the clock (the imported libraries, CUDA's context): the peak
    # minus this is what the load itself added
    rss_before = peak_rss_bytes("VmRSS")
    device_peak = DevicePeak(device) if device.startswith("cuda") else None
    start = T_PROCESS if e2e else time.perf_counter()
    extra: dict = {}
    if kind == "transformers":
        import torch
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        kwargs: dict = {"dtype": torch.float32 if method == "fp32" else torch.bfloat16, "device_map": device}
        if method == "nf4":
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=["lm_head"])
        elif method == "int8":
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["lm_head"])
        model = AutoModelForCausalLM.from_pretrained(ckpt, **kwargs)
    elif kind == "loadstone":
        import loadstone

        plugins = None  # what a user's load does: the installed plugins, discovered
        if method in ("nf4", "int8"):  # the GPU machine runs loadstone-bnb from a source tree
            from loadstone.testing import plugins_with

            plugins = plugins_with(method, "loadstone_bnb.plugin", "bnb")
        name, _, option = engine.partition(":")
        options = {}
        for pair in filter(None, option.split(",")):
            key, _, value = pair.partition("=")
            options[key] = int(value) if value.isdigit() else value
        budget = options.pop("max_memory", None)
        if "ablate" in options:
            ABLATIONS[options.pop("ablate")]()
        result = loadstone.load(ckpt, quantization=None if method in ("bf16", "fp32") else method, placement=device,
                                dtype="float32" if method == "fp32" else "bfloat16", trainable=False, progress=False, plugins=plugins, engine=name,
                                engine_options=options, max_memory={device: budget} if budget else None)
        model = result.model
        report = result.report
        extra = {"engine": report.engine.get("name"), "stages": {k: round(v, 3) for k, v in report.stages.items()},
                 "plan_peak_bytes": report.placement.get("peak_bytes_per_device"),
                 "notes": [n for n in report.notes if n.startswith("engine")],
                 "engine_timings": report.engine.get("timings"), "engine_options": report.engine.get("options"),
                 "extra_bytes": report.engine.get("extra_bytes")}
    elif method == "instanttensor":
        from instanttensor import safe_open as it_open
        from instanttensor._impl import BackendPolicy

        model = {}
        chunk = {"chunk_size": engine} if engine else {}
        with it_open(files_of(ckpt), framework="pt", device=0, backend=BackendPolicy.BUFFERED, **chunk) as fh:
            for key, value in fh.tensors():
                model[key] = value
    elif method == "fastsafetensors":  # its buffers are freed at close: each tensor is cloned out, as a loader must
        from fastsafetensors import fastsafe_open

        model = {}
        with fastsafe_open(filenames=files_of(ckpt), nogds=True, device=device) as fh:
            for key in fh.keys():
                model[key] = fh.get_tensor(key).clone()
    elif method == "safetensors":
        from safetensors.torch import load_file

        model = {}
        for path in files_of(ckpt):
            model.update(load_file(path, device=device))
    elif method == "disk":  # the disk's direct-read bandwidth: 16 threads, O_DIRECT, 64 MiB reads
        import mmap
        import threading

        def read(path: str) -> None:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
            buf = mmap.mmap(-1, 64 << 20)
            try:
                offset = 0
                while True:
                    n = os.preadv(fd, [buf], offset)
                    if n <= 0:
                        break
                    offset += n
            finally:
                os.close(fd)

        threads = [threading.Thread(target=read, args=(p,)) for p in files_of(ckpt)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        model = None
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
    elif model is not None:
        # On the CPU from_pretrained maps the files and reads a weight when it is first used: "ready"
        # means every weight in memory, so every row touches every weight inside its clock.
        tensors = model.values() if isinstance(model, dict) else [*model.parameters(), *model.buffers()]
        # one element per 4 KiB page: every page is read, little is computed
        touched = float(sum(t.reshape(-1)[::max(1, 4096 // t.element_size())].float().sum().item()
                            for t in tensors if t.numel()))
        del touched
    wall = time.perf_counter() - start
    nbytes = sum(os.path.getsize(p) for p in files_of(ckpt))
    record = {"row": row, "wall_s": round(wall, 3), "gb_per_s": round(nbytes / wall / 1e9, 2),
              "peak_rss_gib": round(peak_rss_bytes() / 2**30, 2), "rss_before_gib": round(rss_before / 2**30, 2),
              **extra}
    if device.startswith("cuda"):
        record["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        record["peak_gpu_device_gib"] = round(device_peak.stop() / 2**30, 2)
    if kind in ("transformers", "loadstone") and method in ("bf16", "fp32") and not isinstance(model, dict):
        record["checksum"] = float(sum(p.float().sum().item() for p in list(model.parameters())[:3]))
    del model
    return record


def run_row(row: str, ckpt: str, device: str, timeout: int) -> dict:
    if row.startswith("cold_") and not drop_page_cache():
        return {"row": row, "skipped": "cannot drop the page cache here (needs root and a writable drop_caches)"}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", row, ckpt, device],
                          capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        return {"row": row, "error": (done.stderr or done.stdout)[-1500:]}
    record = json.loads(lines[-1])
    record["process_s"] = round(time.perf_counter() - started, 2)
    return record


def median_run(records: list[dict]) -> dict:
    """The run with the median wall time (the upper one of an even count), with every run's time."""
    timed = sorted((r for r in records if "wall_s" in r), key=lambda r: r["wall_s"])
    if not timed:
        return records[-1]
    chosen = dict(timed[len(timed) // 2])
    if len(records) > 1:
        chosen["wall_s_runs"] = [r.get("wall_s") for r in records]
        for key in ("stages", "engine_timings", "notes"):  # what moved between rounds
            if any(key in r for r in records):
                chosen[f"{key}_runs"] = [r.get(key) for r in records]
    return chosen


def main() -> None:
    if sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2], sys.argv[3], sys.argv[4])), flush=True)
        return
    out = sys.argv[1]
    small, cpu = "--small" in sys.argv, "--cpu" in sys.argv
    rows = list(CPU_ROWS if cpu else DEFAULT_ROWS)
    if "--rows" in sys.argv:
        rows = sys.argv[sys.argv.index("--rows") + 1].split(",")
    if small or cpu:
        rows = [r for r in rows if ROWS[r][1] != "instanttensor" and not (small and r.startswith("cold_"))]
    # optional readers: measured where they are installed, and said so where they are not
    import importlib.util

    rows = [r for r in rows if ROWS[r][1] != "fastsafetensors" or importlib.util.find_spec("fastsafetensors")
            or print(f"{r}: skipped (fastsafetensors is not installed)", flush=True)]
    ckpt = small_checkpoint() if small else cpu_checkpoint() if cpu else make_checkpoint(False)
    device = "cpu" if small or cpu else "cuda:0"
    uncompiled = compile_sources()
    warm_page_cache(files_of(ckpt))  # once, for every warm row alike
    repeat = int(sys.argv[sys.argv.index("--repeat") + 1]) if "--repeat" in sys.argv else 1
    runs: dict[str, list[dict]] = {row: [] for row in rows}
    for _ in range(repeat):
        for row in rows:
            record = run_row(row, ckpt, device, timeout=300)
            print(json.dumps(record), flush=True)
            runs[row].append(record)
    results = [median_run(runs[row]) for row in rows]
    by_row = {r["row"]: r for r in results}
    for record in results:
        baseline = BASELINE.get(ROWS[record["row"]][1], "")
        if record["row"].endswith("_preimport") and baseline + "_preimport" in by_row:
            baseline += "_preimport"  # against transformers with the same imports before its clock
        base = by_row.get(baseline, {})
        if "wall_s" in record and "wall_s" in base and not record["row"].startswith(("e2e_", "cold_")):
            record["speedup_vs_transformers"] = round(base["wall_s"] / record["wall_s"], 2)
    for a, b in (("e2e_loadstone_bf16", "e2e_transformers_bf16"), ("e2e_loadstone_nf4", "e2e_transformers_nf4"),
                 ("e2e_loadstone_bf16_mmap", "e2e_transformers_bf16"),
                 ("cold_loadstone_native_bf16", "cold_transformers_bf16"),
                 ("cold_loadstone_native_bf16_mmap", "cold_transformers_bf16")):
        if "wall_s" in by_row.get(a, {}) and "wall_s" in by_row.get(b, {}):
            by_row[a]["speedup_vs_transformers"] = round(by_row[b]["wall_s"] / by_row[a]["wall_s"], 2)
    import torch

    meta = {"date": time.strftime("%Y-%m-%d"), "host": platform.node(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "checkpoint": ckpt, "checkpoint_bytes": sum(os.path.getsize(p) for p in files_of(ckpt)),
            "command": "python3 bench/gpu_engines.py OUTDIR" + (" --small" if small else " --cpu" if cpu else "")
            + (f" --repeat {repeat}" if repeat > 1 else ""), "repeat": repeat,
            "uncompiled_sources": uncompiled}  # compiled at each import, inside every row's clock
    for lib in ("transformers", "bitsandbytes", "peft", "accelerate", "safetensors", "instanttensor"):
        try:
            from importlib.metadata import version

            meta[lib] = version(lib)
        except Exception:  # not installed here
            meta[lib] = None
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "cpu_engines.json" if cpu else "gpu_engines.json"), "w") as fh:
        json.dump({"meta": meta, "rows": results}, fh, indent=1)
    print(f"\n{'row':34} {'wall s':>7} {'GB/s':>6} {'RSS GiB':>8} {'GPU GiB':>8} {'device':>7} {'x transf.':>9}")
    for r in results:
        print(f"{r['row']:34} {r.get('wall_s', '-'):>7} {r.get('gb_per_s', '-'):>6} {r.get('peak_rss_gib', '-'):>8} "
              f"{r.get('peak_gpu_gib', '-'):>8} {r.get('peak_gpu_device_gib', '-'):>7} "
              f"{r.get('speedup_vs_transformers', ''):>9}"
              + (f"  {r.get('skipped') or r.get('error', '')[-200:]}" if "wall_s" not in r else ""))


if __name__ == "__main__":
    main()
