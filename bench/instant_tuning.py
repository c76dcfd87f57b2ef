"""instanttensor's knobs on this machine: reads in flight (``io_depth``), bytes per read
(``chunk_size``) and ring size, for a raw read of every tensor of the benchmark checkpoint onto one
GPU through the page cache (the native engine's ``reader=instanttensor``, ``io=buffered``).

Per configuration it reports the time to open (instanttensor's own phases: metadata read, ring and
staging allocations in ``_C.open``) and to the last tensor cloned out, in one process, configurations
interleaved round by round, torch's cache emptied between loads (each load allocates afresh, as a
fresh process would). The page cache is warmed first.

    python3 bench/instant_tuning.py OUT [--repeat 3] [--depths 0,16,24] [--chunks 2,4,8] [--rings default,all]

(depth 0: instanttensor's default, cores - 4; chunks in MiB; ring ``all``: the whole checkpoint,
as the read-ahead takes it).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(__file__))
from gpu_bnb import CKPT  # noqa: E402  (the benchmark checkpoint)
from measure import files_of, warm_page_cache  # noqa: E402


def one_load(files: list[str], depth: int, chunk: int, ring: int | None) -> dict[str, float]:
    import torch
    from instanttensor import safe_open
    from instanttensor._impl import BackendPolicy

    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        handle = safe_open(files, framework="pt", device="cuda:0", backend=BackendPolicy.BUFFERED,
                           io_depth=depth or None, chunk_size=chunk, buffer_size=ring, max_free_mem_usage=1.0)
    opened = time.perf_counter()
    nbytes = 0
    with handle:
        for _, tensor in handle.tensors():
            nbytes += tensor.numel() * tensor.element_size()
            del tensor
        torch.cuda.synchronize()
        done = time.perf_counter()
    return {"open_ms": (opened - started) * 1e3, "metadata_ms": (handle.open_time - handle.init_time) * 1e3,
            "c_open_ms": (opened - handle.open_time) * 1e3, "wall_s": done - started,
            "gb_per_s": nbytes / (done - started) / 1e9, "io_depth": handle.io_depth, "ring": handle.buffer_size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--depths", default="0,16,24")
    parser.add_argument("--chunks", default="2,4,8")
    parser.add_argument("--rings", default="default,all")
    args = parser.parse_args()
    files = files_of(CKPT)
    total = sum(os.path.getsize(f) for f in files)
    warm_page_cache(files)
    configs = list(itertools.product([int(d) for d in args.depths.split(",")],
                                     [int(c) << 20 for c in args.chunks.split(",")],
                                     [None if r == "default" else total for r in args.rings.split(",")]))
    results: dict[str, list[dict[str, float]]] = {}
    for round_ in range(args.repeat):
        for depth, chunk, ring in configs:
            key = f"depth={depth or 'default'} chunk={chunk >> 20}MiB ring={'all' if ring else 'default'}"
            run = one_load(files, depth, chunk, ring)
            results.setdefault(key, []).append(run)
            print(json.dumps({"config": key, "round": round_, **{k: round(v, 3) for k, v in run.items()}}), flush=True)
    print(f"\n{'config':45s} {'open ms':>8s} {'wall s':>7s} {'GB/s':>6s}  (medians of {args.repeat})")
    summary = {}
    for key, runs in results.items():
        summary[key] = {k: round(statistics.median(r[k] for r in runs), 4) for k in runs[0]}
        print(f"{key:45s} {summary[key]['open_ms']:8.1f} {summary[key]['wall_s']:7.3f} {summary[key]['gb_per_s']:6.2f}")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "instant_tuning.json"), "w") as f:
        import torch
        from importlib.metadata import version

        machine = {"date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(), "gpu": torch.cuda.get_device_name(0),
                   "torch": torch.__version__, "instanttensor": version("instanttensor")}
        json.dump({"command": "python3 bench/" + " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]]),
                   "machine": machine, "checkpoint_bytes": total,
                   "medians": summary, "runs": results}, f, indent=1)


if __name__ == "__main__":
    main()
