"""bench/gpu_engines.py runs (on a tiny model here): the rival and loadstone load the same weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "gpu_engines.py"


@pytest.mark.slow
def test_engines_benchmark_runs_every_row_in_its_own_process(tmp_path):
    rows = ("transformers_bf16,loadstone_native_bf16,loadstone_native_bf16_mmap,loadstone_transformers_bf16,"
            "loadstone_transformers_bf16_mmap,loadstone_native_bf16_lateplan,transformers_bf16_preimport,"
            "loadstone_native_bf16_preimport")
    done = subprocess.run([sys.executable, str(BENCH), str(tmp_path), "--small", "--rows", rows, "--repeat", "2"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads((tmp_path / "gpu_engines.json").read_text())
    assert data["meta"]["repeat"] == 2 and data["meta"]["command"].endswith("--small --repeat 2")
    # every source a load imports has its bytecode written before the first row (the venv is writable)
    assert not [path for path in data["meta"]["uncompiled_sources"] if "site-packages" in path or "/core/" in path]
    by_row = {r["row"]: r for r in data["rows"]}
    assert list(by_row) == rows.split(",")
    for record in by_row.values():
        assert record["wall_s"] > 0 and len(record["wall_s_runs"]) == 2 and record["wall_s"] in record["wall_s_runs"]
    # every round's stages, kept for loadstone rows only: what moved between rounds
    native = by_row["loadstone_native_bf16"]
    assert len(native["stages_runs"]) == 2 and native["stages"] in native["stages_runs"]
    assert all(run["load_weights"] > 0 for run in native["stages_runs"])
    assert len(native["engine_timings_runs"]) == 2 and all("stream" in run for run in native["engine_timings_runs"])
    assert "stages_runs" not in by_row["transformers_bf16"]
    # the late-plan ablation: the weights stage starts 0.5 s late, and loads the same weights
    late = by_row["loadstone_native_bf16_lateplan"]
    assert min(late["wall_s_runs"]) >= 0.5 and late["checksum"] == by_row["transformers_bf16"]["checksum"]
    # the wait is in the weights stage, before the engine starts: the engine's own timings exclude it
    assert all(run["load_weights"] >= 0.5 for run in late["stages_runs"])
    assert all(run["skeleton"] + run["stream"] < 0.5 for run in late["engine_timings_runs"])
    # the same weights on every side (the checksum of every parameter)
    assert by_row["loadstone_native_bf16"]["checksum"] == by_row["transformers_bf16"]["checksum"]
    assert by_row["loadstone_native_bf16_mmap"]["checksum"] == by_row["transformers_bf16"]["checksum"]
    assert by_row["loadstone_native_bf16_mmap"]["engine_options"]["reader"] == "mmap"
    for row in ("loadstone_transformers_bf16", "loadstone_transformers_bf16_mmap"):  # pread, mmap
        assert by_row[row]["engine"] == "transformers" and by_row[row]["checksum"] == by_row["transformers_bf16"]["checksum"]
    assert by_row["loadstone_transformers_bf16_mmap"]["engine_options"] == {"reader": "mmap"}
    assert by_row["transformers_bf16"]["speedup_vs_transformers"] == 1.0
    # the model's code imported before the clock: the load imports (almost) nothing inside it, and
    # its ratio is against transformers with the same imports done first
    pre = by_row["loadstone_native_bf16_preimport"]
    assert max(run["imports"] for run in pre["stages_runs"]) < min(run["imports"] for run in native["stages_runs"])
    assert pre["checksum"] == by_row["transformers_bf16"]["checksum"]
    assert pre["speedup_vs_transformers"] == round(by_row["transformers_bf16_preimport"]["wall_s"] / pre["wall_s"], 2)


@pytest.mark.slow
def test_the_profiling_script_profiles_a_load_and_times_a_second_one(tmp_path):
    script = BENCH.with_name("profile_load.py")
    done = subprocess.run([sys.executable, str(script), str(tmp_path), "--small", "--device", "cpu"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    text = (tmp_path / "profile_bf16_cpu.txt").read_text()
    summary = json.loads(text[:text.index("\n\n")])
    assert summary["first_stages"]["load_weights"] > 0 and summary["second_stages"]["load_weights"] > 0
    assert summary["second_engine"]["stream"] > 0
    assert "load_once" in text  # the call tree (pyinstrument's, or cProfile's listing without it)


@pytest.mark.slow
def test_the_timeline_records_each_step_of_one_load_in_order(tmp_path):
    script = BENCH.with_name("profile_load.py")
    done = subprocess.run([sys.executable, str(script), str(tmp_path), "--small", "--device", "cpu", "--timeline"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "timeline_bf16_cpu.json").read_text())
    steps = {r["step"]: r for r in summary["steps"]}
    order = ["plugins.PluginManager.discover", "pipeline.inspect_weights", "pipeline.start_read_ahead",
             "pipeline.inspect", "pipeline.plan_load", "pipeline.load_weights", "pipeline.prepare"]
    assert [steps[s]["start_ms"] for s in order] == sorted(steps[s]["start_ms"] for s in order)
    assert sum(r["step"] == "plugins.PluginManager.discover" for r in summary["steps"]) == 1
    engine = steps["native.NativeEngine.load"]  # inside load_weights, finishing inside the engine
    finishing = steps["native.finish_loading"]
    assert steps["pipeline.load_weights"]["start_ms"] <= engine["start_ms"] <= finishing["start_ms"]
    assert finishing["end_ms"] <= engine["end_ms"] <= summary["wall_ms"]
    started = steps["native.start_finishing"]  # on the skeleton, before the stream
    assert engine["start_ms"] <= started["start_ms"] <= started["end_ms"] <= finishing["start_ms"]
    assert summary["stages"]["load_weights"] > 0 and "the whole load" in done.stdout


@pytest.mark.slow
def test_a_late_plan_starts_the_engine_that_much_later(tmp_path):
    script = BENCH.with_name("profile_load.py")
    done = subprocess.run([sys.executable, str(script), str(tmp_path), "--small", "--device", "cpu", "--timeline",
                           "--late-plan", "0.3"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    steps = {r["step"]: r for r in json.loads((tmp_path / "timeline_bf16_cpu_lateplan.json").read_text())["steps"]}
    assert steps["native.NativeEngine.load"]["start_ms"] - steps["pipeline.load_weights"]["start_ms"] >= 300


def test_the_benchmarks_compile_every_source_a_load_imports(tmp_path):
    # a module outside the named packages, imported by another (as transformers imports psutil)
    (tmp_path / "probe_outer.py").write_text("import probe_inner\n")
    (tmp_path / "probe_inner.py").write_text("VALUE = 1\n")
    # In a process of its own, as the benchmarks run it: run inside a test worker, compileall's
    # process pool left that worker so that a later test's Ctrl-C went unseen (test_offload_faults,
    # in the full suite only). PYTHONDONTWRITEBYTECODE: only the compiling writes bytecode here.
    code = (f"import sys; sys.path.insert(0, {str(BENCH.parent)!r}); from measure import compile_sources; "
            "print(compile_sources(('probe_outer',)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(tmp_path), "PYTHONDONTWRITEBYTECODE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
    assert {p.name.split(".")[0] for p in (tmp_path / "__pycache__").iterdir()} == {"probe_outer", "probe_inner"}
