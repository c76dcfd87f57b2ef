"""The ``loadstone`` command line: help texts, JSON output equal to the Python API's report,
the plugin list, and option errors as one paragraph with exit status 2."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

import loadstone
from loadstone.cli import build_parser, main

LOADSTONE_CLI = str(Path(sys.executable).parent / "loadstone")
COMMANDS = ["load", "plan", "plugins", "demo"]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse: --help and usage errors
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def _parsers() -> dict[str, argparse.ArgumentParser]:
    top = build_parser()
    sub = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    return {"": top, **{name: sub.choices[name] for name in COMMANDS}}


@pytest.mark.parametrize("command", ["", *COMMANDS])
def test_help_explains_every_option_with_an_example(command, capsys):
    parser = _parsers()[command]
    code, out, _ = run(capsys, *([command] if command else []), "--help")
    assert code == 0
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            assert all(f"    {name}" in out for name in COMMANDS)
            continue
        assert action.help and action.help != argparse.SUPPRESS, action
        for option in action.option_strings:
            assert option in out, f"{option} missing from `loadstone {command} --help`"
        if not action.option_strings:
            assert action.metavar in out
    assert "examples:" in out
    examples = out.split("examples:", 1)[1]
    assert f"  loadstone {command}".rstrip() + " " in examples
    for action in parser._actions:  # every option taking a value shows one, or lists the choices
        if action.option_strings and action.nargs != 0:
            shown = any(option in examples for option in action.option_strings)
            assert shown or "e.g." in action.help or ", " in action.help, action.option_strings


@pytest.mark.slow
def test_real_entry_point_help(python_subprocess):
    for argv in (["--help"], ["load", "--help"], ["plugins", "--help"]):
        done = subprocess.run([LOADSTONE_CLI, *argv], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and "examples:" in done.stdout and done.stderr == ""


def _comparable(report: dict) -> dict:
    """A report without what legitimately differs between two runs: wall times (the stages', the
    engine's), memory peaks, and the memory budget (without max_memory it is the free memory
    measured at planning time)."""
    out = {k: v for k, v in report.items() if k not in ("stages", "memory")}
    out["placement"] = {k: v for k, v in out["placement"].items() if k != "budget"}
    out["engine"] = {k: v for k, v in out.get("engine", {}).items() if k != "timings"}
    return out


def test_load_json_matches_the_python_api(capsys, llama_lora):
    adapter = str(llama_lora)
    code, out, err = run(capsys, "load", adapter, "--placement", "cpu", "--json", "--quiet")
    assert code == 0, err
    from_cli = json.loads(out)
    from_api = json.loads(loadstone.load(adapter, placement="cpu", progress=False).report.to_json())
    assert _comparable(from_cli) == _comparable(from_api)
    assert from_cli["kind"] == "load" and from_cli["adapters"][0]["name"] == "default"
    assert set(from_cli["stages"]) == set(from_api["stages"])


def test_plan_json_matches_the_python_api(capsys, sharded_llama, tmp_path):
    argv = ["plan", str(sharded_llama), "--placement", "sequential", "--max-memory", "cpu=400KB",
            "--offload-folder", str(tmp_path), "--dtype", "bf16", "--json"]
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    from_cli = json.loads(out)
    planned = loadstone.plan(str(sharded_llama), placement="sequential", max_memory={"cpu": "400KB"},
                             offload_folder=str(tmp_path), dtype="bfloat16")
    assert _comparable(from_cli) == _comparable(json.loads(planned.report.to_json()))
    assert from_cli["kind"] == "plan" and from_cli["placement"]["device_map"] == planned.device_map
    assert from_cli["request"]["max_memory"] == {"cpu": 400_000} and from_cli["dtype"] == "bfloat16"


class Chatty:
    """A plugin whose libraries print to stdout while a model loads (gptqmodel logs that way)."""

    @loadstone.hookimpl
    def loadstone_after_plan(self, plan, request):
        print("INFO  Kernel: selected: `SomeKernel`")


@pytest.mark.parametrize("command", ["load", "plan"])
def test_json_on_stdout_survives_libraries_that_print(capsys, monkeypatch, sharded_llama, command):
    import loadstone.plugins

    monkeypatch.setattr(loadstone.plugins, "_default", loadstone.PluginManager(extra_plugins=[("chatty", Chatty())]))
    code, out, err = run(capsys, command, str(sharded_llama), "--placement", "cpu", "--json", "--quiet")
    assert code == 0, err
    assert json.loads(out)["kind"] == command
    assert "Kernel: selected" not in err  # library output, dropped without --verbose
    code, out, err = run(capsys, command, str(sharded_llama), "--placement", "cpu", "--json", "--quiet", "--verbose")
    assert code == 0, err
    assert json.loads(out)["kind"] == command and "Kernel: selected" in err


def test_text_report_is_a_readable_table(capsys, sharded_llama):
    code, out, _ = run(capsys, "plan", str(sharded_llama), "--placement", "cpu")
    assert code == 0
    assert out.startswith("loadstone plan\n==============")
    for label in ("reference", "base", "model", "checkpoint", "dtype", "quantization", "placement", "fits",
                  "decisions"):
        assert f"\n{label}" in out, label
    assert "safetensors, 3 file(s)" in out


def test_plugins_text_and_json(capsys, monkeypatch):
    monkeypatch.setenv("LOADSTONE_PLUGINS", "")
    loadstone.reset_plugin_manager()
    try:
        code, out, _ = run(capsys, "plugins", "--json")
        assert code == 0
        listed = {p["name"]: p for p in json.loads(out)}
        assert {"builtin-quantization", "builtin-placement", "builtin-resolvers"} <= set(listed)
        assert all(p["distribution"] == "loadstone" and p["version"] == loadstone.__version__
                   for p in listed.values() if p["builtin"])
        placements = {c["name"] for c in listed["builtin-placement"]["components"]}
        assert placements == {"auto", "balanced", "sequential", "cpu", "device", "rank", "explicit"}
        code, out, _ = run(capsys, "plugins")
        assert code == 0
        assert f"builtin-resolvers  [loadstone {loadstone.__version__}, built-in]  loaded" in out
        assert "methods: none; available" in out
    finally:
        loadstone.reset_plugin_manager()


@pytest.mark.parametrize("argv,error,mentions", [
    (["load", "{ckpt}", "--max-memory", "cpu=lots"], "OptionError", "max_memory[cpu]"),
    (["load", "{ckpt}", "--max-memory", "cpu=-5GB"], "OptionError", "-5GB"),
    (["plan", "{ckpt}", "--max-memory", "gpu7=1GB"], "OptionError", "gpu7"),
    (["load", "{ckpt}", "--max-memory", "cuda:0=1GB"], "PlacementError", "cuda:0"),
    (["load", "{ckpt}", "--max-memory", "cpu"], "usage", "--max-memory"),
    (["plan", "{ckpt}", "-o", "double_quant"], "usage", "--quant-option"),
    (["plan", "{ckpt}", "-q", "none", "-o", "group_size=64"], "OptionError", "group_size"),
    (["plan", "{ckpt}", "--dtype", "int3"], "OptionError", "int3"),
    (["plan", "{ckpt}", "--task", "summarise"], "OptionError", "summarise"),
    (["plan", "{ckpt}", "--device-map", "{tmp}/missing.json"], "OptionError", "--device-map"),
    (["plan", "{ckpt}", "--placement", "everywhere"], "ComponentNotFoundError", "everywhere"),
    (["plan", "{ckpt}", "--adapter", "=x"], "OptionError", "adapter name"),
    (["frobnicate"], "usage", "frobnicate"),
])
def test_option_errors_exit_2_with_one_paragraph(argv, error, mentions, capsys, sharded_llama, tmp_path):
    if "cuda:0=1GB" in argv and __import__("torch").cuda.is_available():
        pytest.skip("cuda:0 exists here")
    argv = [a.format(ckpt=sharded_llama, tmp=tmp_path) for a in argv]
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err  # one paragraph, no usage block, no traceback
    assert lines[0].startswith(f"error ({error})") and mentions in lines[0]
    assert "Fix:" in lines[0] or "--help" in lines[0]
