"""Do instanttensor's readers wait for Python? Reads beside a busy main thread.

    python3 bench/reads_beside_python.py OUTDIR [--repeat N] [--busy-ms MS]

The native engine's read-ahead runs instanttensor's C++ readers while the main thread imports the
model's code and plans the load, pure Python that holds the GIL. If the readers needed the GIL
between reads, that work would slow them. One process (libraries imported, CUDA initialised),
the 8B checkpoint read whole into a ring the size of the checkpoint, 4 MiB reads; after the open
the main thread, for ``--busy-ms`` (default 250):

  sleep          sleeps (holds no GIL, uses no CPU): the reads alone
  python         runs a pure-Python loop (holds the GIL, one core busy)
  python_fast    the same loop with ``sys.setswitchinterval(0.0002)`` (a thread waiting for the
                 GIL gets it within 0.2 ms instead of 5 ms)
  other_process  sleeps while another process runs the loop (one core busy, no GIL shared)

then drains the ring. ``reads_ms``: open to drained (the reads ended no later). Rounds are
interleaved. Writes OUTDIR/reads_beside_python.json and prints medians.
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
from measure import files_of, warm_page_cache  # noqa: E402
from plan_beside_reads import drain, open_reads  # noqa: E402

MODES = ["sleep", "python", "python_fast", "other_process"]


BUSY = """
import time
def busy(seconds):
    end, n = time.perf_counter() + seconds, 0
    while time.perf_counter() < end:  # dict and string work, like an import's
        d = {str(i): i for i in range(200)}
        n += len("".join(d))
    return n
"""
exec(BUSY)  # defines busy(seconds): pure Python for that long


def one(mode: str, files: list[str], seconds: float) -> float:
    other = None
    if mode == "other_process":
        other = subprocess.Popen([sys.executable, "-c", BUSY + f"print('go', flush=True); busy({seconds})"],
                                 stdout=subprocess.PIPE, text=True)
        other.stdout.readline()
    start = time.perf_counter()
    handle = open_reads(files, 12)
    if mode == "sleep" or mode == "other_process":
        time.sleep(seconds)
    else:
        previous = sys.getswitchinterval()
        if mode == "python_fast":
            sys.setswitchinterval(0.0002)
        try:
            busy(seconds)
        finally:
            sys.setswitchinterval(previous)
    drain(handle)
    elapsed = time.perf_counter() - start
    if other is not None:
        other.wait()
    return round(elapsed * 1e3, 1)


def main() -> None:
    out = sys.argv[1]
    repeat = int(sys.argv[sys.argv.index("--repeat") + 1]) if "--repeat" in sys.argv else 5
    seconds = (float(sys.argv[sys.argv.index("--busy-ms") + 1]) if "--busy-ms" in sys.argv else 250.0) / 1e3
    import torch

    torch.empty(1, device="cuda:0")
    files = files_of(make_checkpoint(False))
    warm_page_cache(files)
    one("sleep", files, seconds)  # first open pays for CUDA's and instanttensor's set-up
    runs: dict[str, list[float]] = {m: [] for m in MODES}
    for _ in range(repeat):
        for mode in MODES:
            runs[mode].append(one(mode, files, seconds))
            print(mode, runs[mode][-1], flush=True)
    medians = {m: statistics.median(v) for m, v in runs.items()}
    meta = {"date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0), "busy_ms": seconds * 1e3,
            "command": f"python3 bench/reads_beside_python.py OUTDIR --repeat {repeat} --busy-ms {seconds * 1e3:g}"}
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "reads_beside_python.json"), "w") as fh:
        json.dump({"meta": meta, "medians_ms": medians, "runs_ms": runs}, fh, indent=1)
    for mode in MODES:
        print(f"{mode:14} reads_ms median {medians[mode]:8.1f}  runs {runs[mode]}")


if __name__ == "__main__":
    main()
