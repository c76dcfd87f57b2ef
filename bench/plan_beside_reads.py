"""What reading ahead does to the work beside it: the import of a model's code and the plan.

    python3 bench/plan_beside_reads.py OUTDIR [--repeat N] [--modes quiet,same12,other12,...]

The native engine starts instanttensor's readers before it imports the model's code and plans the
load; the load ends when both are done. This measures, in a fresh process per run (torch,
transformers, loadstone imported and CUDA initialised before the clock, as in gpu_engines.py),
how long importing transformers' Llama modules and ``loadstone.plan`` take:

  quiet      nothing else running
  sameD      instanttensor reading the 8B checkpoint (whole-checkpoint ring, 4 MiB reads, D reads
             in flight) in this process, as the engine's read-ahead does
  otherD     the same reads in another process (its own address space), started first

and, for the modes that read, when the reads were done (the ring drained after the plan). Writes
OUTDIR/plan_beside_reads.json and prints medians. Needs a CUDA GPU and instanttensor.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_bnb import make_checkpoint  # noqa: E402
from measure import compile_sources, files_of, warm_page_cache  # noqa: E402

CHUNK = 4 << 20


def open_reads(files: list[str], depth: int):
    from instanttensor import safe_open
    from instanttensor._impl import BackendPolicy

    ring = sum(os.path.getsize(f) for f in files)
    handle = safe_open(files, framework="pt", device=0, backend=BackendPolicy.BUFFERED, buffer_size=ring,
                       io_depth=depth, chunk_size=CHUNK, max_free_mem_usage=1.0)
    return handle.__enter__()


def drain(handle) -> None:
    import torch

    for _name, tensor in handle.tensors():
        del tensor
    torch.cuda.synchronize()
    handle.__exit__(None, None, None)


def reader_process(files: list[str], depth: int) -> None:
    """The ``other`` side: open, say so, read everything, exit."""
    import torch

    torch.empty(1, device="cuda:0")
    handle = open_reads(files, depth)
    print("reading", flush=True)
    drain(handle)
    print("drained", flush=True)  # before the interpreter's exit, which the caller must not time


def child(mode: str, ckpt: str) -> dict:
    import torch
    import transformers  # noqa: F401

    import loadstone
    from loadstone.stages.inspect.config import import_transformers

    import_transformers()
    torch.empty(1, device="cuda:0")
    torch.cuda.synchronize()
    files = files_of(ckpt)
    depth = int(mode[4:] if mode.startswith("same") else mode[5:] if mode.startswith("other") else 0)
    handle = other = None
    start = time.perf_counter()
    if mode.startswith("same"):
        handle = open_reads(files, depth)
    elif mode.startswith("other"):
        other = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--reader", ckpt, str(depth)],
                                 stdout=subprocess.PIPE, text=True)
        other.stdout.readline()  # its readers have started
        start = time.perf_counter()
    opened = time.perf_counter()
    from transformers.models.llama import modeling_llama  # noqa: F401

    imported = time.perf_counter()
    loadstone.plan(ckpt, placement="cuda:0", dtype="bfloat16", trainable=False)
    planned = time.perf_counter()
    if handle is not None:
        drain(handle)
    if other is not None:
        other.stdout.readline()  # "drained"
    done = time.perf_counter()
    if other is not None:
        other.wait()
    return {"mode": mode, "open_ms": round((opened - start) * 1e3, 1), "import_ms": round((imported - opened) * 1e3, 1),
            "plan_ms": round((planned - imported) * 1e3, 1),
            "reads_done_ms": round((done - start) * 1e3, 1) if depth else None}


def main() -> None:
    if sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2], sys.argv[3])), flush=True)
        return
    if sys.argv[1] == "--reader":
        reader_process(files_of(sys.argv[2]), int(sys.argv[3]))
        return
    out = sys.argv[1]
    repeat = int(sys.argv[sys.argv.index("--repeat") + 1]) if "--repeat" in sys.argv else 5
    modes = (sys.argv[sys.argv.index("--modes") + 1].split(",") if "--modes" in sys.argv
             else ["quiet", "same12", "same6", "same4", "other12"])
    ckpt = make_checkpoint(False)
    compile_sources()  # as gpu_engines.py does: a pip install leaves bytecode
    warm_page_cache(files_of(ckpt))
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    for _ in range(repeat):
        for mode in modes:
            done = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", mode, ckpt],
                                  capture_output=True, text=True, timeout=300)
            lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
            record = json.loads(lines[-1]) if lines else {"mode": mode, "error": done.stderr[-1500:]}
            print(json.dumps(record), flush=True)
            runs[mode].append(record)
    medians = {}
    for mode, records in runs.items():
        ok = [r for r in records if "error" not in r]
        medians[mode] = {key: statistics.median(r[key] for r in ok) if ok and ok[0].get(key) is not None else None
                         for key in ("open_ms", "import_ms", "plan_ms", "reads_done_ms")}
    import torch
    import instanttensor

    meta = {"date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0), "instanttensor": getattr(instanttensor, "__version__", None),
            "command": "python3 bench/plan_beside_reads.py OUTDIR --repeat %d --modes %s" % (repeat, ",".join(modes))}
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "plan_beside_reads.json"), "w") as fh:
        json.dump({"meta": meta, "medians": medians, "runs": runs}, fh, indent=1)
    print(f"\n{'mode':10} {'open ms':>8} {'import ms':>10} {'plan ms':>8} {'reads done ms':>14}")
    for mode, m in medians.items():
        print(f"{mode:10} {m['open_ms']!s:>8} {m['import_ms']!s:>10} {m['plan_ms']!s:>8} {m['reads_done_ms']!s:>14}")


if __name__ == "__main__":
    main()
