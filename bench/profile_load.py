"""Profile one loadstone load on the benchmark checkpoint: where its wall time goes.

Prepares the process exactly like a ``bench/gpu_engines.py`` row (the same libraries imported and
CUDA initialised before the clock), then profiles ``loadstone.load`` with pyinstrument (a sampling
profiler: it sees time spent in C extensions and in imports) and writes the call tree as text and
HTML into OUTDIR. A second, unprofiled load in the same process shows what the first one paid once
(imports of modelling code, CUDA initialisation of libraries).

    python3 bench/profile_load.py OUTDIR [--method bf16|nf4|int8] [--device cuda:0|cpu] [--small]
        [--engine loadstone|transformers] [--engine-option key=value ...] [--timeline [--raw]]
        [--late-plan SECONDS]

Needs ``pyinstrument`` (``pip install pyinstrument``); falls back to cProfile's cumulative listing.

``--timeline`` profiles nothing: it records when each step of the kernel's load (plugin discovery,
headers, the engine's read-ahead, configuration, plan, stream, transformers' finishing, checks,
and the garbage collector's pauses of 0.5 ms or more) starts and ends, in milliseconds from the call, for the first load of the process, unprofiled,
and writes ``timeline_*.json``. A sampling profiler cannot show what overlaps what: the engine's
readers run beside the plan, and the load takes as long as the later of the two. With ``--raw``
it times instanttensor's raw-tensor load instead (the ``instanttensor_buffered`` row of
``gpu_engines.py``: its import, ``safe_open``, first and last tensor, close), for comparison.

``--late-plan S`` starts the weight-loading stage S seconds late (the ``loadstone_native_bf16_lateplan``
ablation of ``gpu_engines.py``): the read-ahead has read everything by then, and the profile of
the engine's stage is the cost of emptying a full ring, without the readers beside it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_bnb import make_checkpoint  # noqa: E402  (the benchmarks' checkpoint)
from measure import compile_sources, delay_load_weights  # noqa: E402


def load_once(ckpt: str, method: str, device: str, options: dict, engine: str = "auto"):
    import loadstone
    from loadstone.testing import plugins_with

    plugins = plugins_with(method, "loadstone_bnb.plugin", "bnb") if method in ("nf4", "int8") else None
    return loadstone.load(ckpt, quantization=None if method == "bf16" else method, placement=device,
                          dtype="bfloat16", trainable=False, progress=False, plugins=plugins,
                          engine=engine, engine_options=options)


# The kernel's steps a timeline records: (module, attribute), as the pipeline calls them.
TIMELINE_STEPS = [
    ("loadstone.plugins", "PluginManager.discover"), ("loadstone.pipeline", "resolve_sources"),
    ("loadstone.pipeline", "inspect_weights"), ("loadstone.pipeline", "start_read_ahead"),
    ("loadstone.pipeline", "inspect"), ("loadstone.pipeline", "plan_load"), ("loadstone.pipeline", "load_weights"),
    ("loadstone.engines.native", "NativeEngine.load"), ("loadstone.engines.native", "start_finishing"),
    ("loadstone.engines.native", "finish_loading"),
    ("loadstone.stages.load_weights", "check_loaded_model"), ("loadstone.pipeline", "prepare"),
    ("loadstone.pipeline", "count_parameters"),
    # inside the read-ahead's start: the page-cache probe, and instanttensor's own open (its import,
    # ring and pinned buffers, readers started)
    ("loadstone.engines.native", "is_cold"), ("loadstone.engines.native", "start_read_ahead"),
    ("loadstone.engines.instant", "InstantReadAhead.__init__"), ("loadstone.engines.instant", "_safe_open"),
    # inside discovery: the entry-point scan, and each plugin's import and registration
    ("loadstone.plugins", "installed_entry_points"), ("loadstone.plugins", "PluginManager._load"),
    # inside the finishing: loadstone's marking, then transformers' own steps
    ("loadstone.engines.finish", "mark_loaded"),
    ("transformers.modeling_utils", "PreTrainedModel._move_missing_keys_from_meta_to_device"),
    ("transformers.modeling_utils", "PreTrainedModel._initialize_missing_keys"),
    ("transformers.modeling_utils", "PreTrainedModel.tie_weights"),
    ("transformers.modeling_utils", "PreTrainedModel._adjust_missing_and_unexpected_keys"),
]


DISCOVERY = "plugins.PluginManager.discover"
GC_SHOWN_S = 0.0005  # collections that took at least this long are steps of the timeline


class Timeline:
    """Records each call of the wrapped steps as milliseconds since :meth:`start`."""

    def __init__(self, steps: list[tuple[str, str]], gc_shown_s: float = GC_SHOWN_S):
        import functools
        import importlib

        self.records: list[dict] = []
        self.zero = time.perf_counter()
        for module_name, attr in steps:
            owner_path, _, name = attr.rpartition(".")
            owner = importlib.import_module(module_name)
            for part in filter(None, owner_path.split(".")):
                owner = getattr(owner, part, None)
            original = getattr(owner, name, None)
            if original is None:  # a step this version of transformers does not have
                continue
            label = f"{module_name.rsplit('.', 1)[-1]}.{attr}"
            setattr(owner, name, functools.wraps(original)(self._timed(original, label)))
        # The garbage collector's pauses hold the interpreter too: a full collection walks every
        # object of torch and transformers (tens of ms), wherever in the load it falls.
        self._gc_started, self._gc_shown_s = 0.0, gc_shown_s
        gc.callbacks.append(self._collected)

    def _collected(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        elif time.perf_counter() - self._gc_started >= self._gc_shown_s:
            self.records.append({"step": f"gc.generation_{info['generation']}", "start_ms": self.ms(self._gc_started),
                                 "end_ms": self.ms()})

    def _timed(self, original: Any, label: str) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.records.append({"step": label, "start_ms": self.ms(started), "end_ms": self.ms()})

        return timed

    def start(self) -> None:
        self.records.clear()
        self.zero = time.perf_counter()

    def ms(self, at: float | None = None) -> float:
        return round(((time.perf_counter() if at is None else at) - self.zero) * 1e3, 2)


def timeline(ckpt: str, args: Any, options: dict, stem: str) -> None:
    """The first load of this process, unprofiled, with its steps' start and end times."""
    import torch

    clock = Timeline(TIMELINE_STEPS)
    clock.start()
    result = load_once(ckpt, args.method, args.device, options, args.engine)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    wall_ms = clock.ms()
    # discovery runs once; the manager's later calls only find it done
    first = [r for r in clock.records if r["step"] == DISCOVERY][:1]
    steps = sorted(first + [r for r in clock.records if r["step"] != DISCOVERY], key=lambda r: r["start_ms"])
    summary = {"wall_ms": wall_ms, "steps": steps, "stages": {k: round(v, 4) for k, v in result.report.stages.items()},
               "engine": result.report.engine.get("timings"),
               "notes": [n for n in result.report.notes if n.startswith("engine")]}
    with open(stem.replace("profile_", "timeline_") + ".json", "w") as f:
        json.dump(summary, f, indent=1)
    print(f"{'start ms':>9} {'end ms':>9} {'took ms':>8}  step")
    for r in steps:
        print(f"{r['start_ms']:9.1f} {r['end_ms']:9.1f} {r['end_ms'] - r['start_ms']:8.1f}  {r['step']}")
    print(f"{0:9.1f} {wall_ms:9.1f} {wall_ms:8.1f}  the whole load (loadstone.load, then the device synchronised)")


def raw_timeline(ckpt: str, device: str, stem: str) -> None:
    """instanttensor's raw-tensor load as the benchmark row runs it, its steps in ms from the call."""
    import torch

    files = sorted(os.path.join(ckpt, f) for f in os.listdir(ckpt) if f.endswith(".safetensors"))
    clock = Timeline([], gc_shown_s=0.0)  # no steps: its clock, and every collection's pause
    clock.start()
    ms = clock.ms

    from instanttensor import safe_open
    from instanttensor._impl import BackendPolicy

    marks = {"imported": ms()}
    tensors = {}
    with safe_open(files, framework="pt", device=torch.device(device).index or 0,
                   backend=BackendPolicy.BUFFERED) as handle:
        marks["opened"] = ms()
        for name, tensor in handle.tensors():
            marks.setdefault("first_tensor", ms())
            tensors[name] = tensor
        marks["last_tensor"] = ms()
    marks["closed"] = ms()
    torch.cuda.synchronize()
    marks["synchronised"] = ms()
    marks["gc_pauses_ms"] = round(sum(r["end_ms"] - r["start_ms"] for r in clock.records), 2)
    with open(stem.replace("profile_", "timeline_raw_") + ".json", "w") as f:
        json.dump(marks, f, indent=1)
    print(json.dumps(marks))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir")
    parser.add_argument("--method", default="bf16", choices=["bf16", "nf4", "int8"])
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--small", action="store_true", help="a tiny checkpoint (checks the script on a CPU)")
    parser.add_argument("--engine", default="auto", help="loadstone's engine (default: auto)")
    parser.add_argument("--engine-option", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--timeline", action="store_true", help="when each step starts and ends, no profiler")
    parser.add_argument("--raw", action="store_true", help="with --timeline: instanttensor's raw-tensor load instead")
    parser.add_argument("--late-plan", type=float, default=0.0, metavar="SECONDS",
                        help="start the weight-loading stage this late (an ablation: a full ring to empty)")
    args = parser.parse_args()
    options = {k: int(v) if v.isdigit() else v for k, _, v in (o.partition("=") for o in args.engine_option)}
    # as gpu_engines.py does before its rows: where no bytecode was written (PYTHONDONTWRITEBYTECODE),
    # each import compiles, which an installed package does not pay
    compile_sources()
    ckpt = make_checkpoint(args.small)

    import torch
    import transformers  # noqa: F401

    import loadstone  # noqa: F401
    from loadstone.stages.inspect import import_transformers

    import_transformers()
    if args.method != "bf16":
        import bitsandbytes  # noqa: F401
    if args.device.startswith("cuda"):
        torch.cuda.init()
        torch.empty(1, device=args.device)
        torch.cuda.synchronize()
    os.makedirs(args.outdir, exist_ok=True)
    engine = "" if args.engine == "auto" else f"_{args.engine}"
    stem = os.path.join(args.outdir, f"profile_{args.method}_{args.device.replace(':', '')}{engine}")
    if args.timeline and args.raw:
        return raw_timeline(ckpt, args.device, stem)
    if args.late_plan:
        delay_load_weights(args.late_plan)
        stem += "_lateplan"
    if args.timeline:
        return timeline(ckpt, args, options, stem)
    try:
        from pyinstrument import Profiler
    except ImportError:
        Profiler = None
    started = time.perf_counter()
    if Profiler is not None:
        profiler = Profiler(interval=0.0005)
        profiler.start()
        result = load_once(ckpt, args.method, args.device, options, args.engine)
        profiler.stop()
        text = profiler.output_text(unicode=False, color=False, show_all=False)
        with open(stem + ".html", "w") as f:
            f.write(profiler.output_html())
    else:
        import cProfile
        import io
        import pstats

        prof = cProfile.Profile()
        result = prof.runcall(load_once, ckpt, args.method, args.device, options, args.engine)
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(60)
        text = out.getvalue()
    first = time.perf_counter() - started
    stages = {k: round(v, 4) for k, v in result.report.stages.items()}
    timings = result.report.engine.get("timings")
    del result
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    started = time.perf_counter()
    again = load_once(ckpt, args.method, args.device, options, args.engine)
    second = time.perf_counter() - started
    summary = {"first_load_s (profiled)": round(first, 3), "first_stages": stages, "first_engine": timings,
               "second_load_s": round(second, 3),
               "second_stages": {k: round(v, 4) for k, v in again.report.stages.items()},
               "second_engine": again.report.engine.get("timings")}
    with open(stem + ".txt", "w") as f:
        f.write(json.dumps(summary, indent=1) + "\n\n" + text)
    print(json.dumps(summary, indent=1))
    print(text)


if __name__ == "__main__":
    main()
