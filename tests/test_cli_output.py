"""What the real ``loadstone`` command prints, for people (stderr holds nothing but loadstone's
own lines; ``--verbose`` lets the libraries speak) and for scripts (``--json`` gives a JSON
object on stdout for a failure too)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

LOADSTONE_CLI = str(Path(sys.executable).parent / "loadstone")

# bitsandbytes logs "Failed to load CPU gemm_4bit_forward from kernels-community" when it is imported
# on a CPU with AVX512-BF16 and without the `kernels` package. This sitecustomize makes it take that
# branch on any CPU (bitsandbytes.functional.has_avx512bf16 answers True to the module that asks at
# import), so that the quiet output is checked on every machine. Only commands that run no 4-bit
# kernel on the CPU use it: the kernel it would pick needs the real instructions.
FORCE_AVX512_BF16 = '''
import importlib.abc, importlib.machinery, sys

class _ForceAvx512Bf16(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "bitsandbytes.functional":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            module.has_avx512bf16 = lambda: True

        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, _ForceAvx512Bf16())
'''
KERNELS_LINE = "Failed to load CPU gemm_4bit_forward from kernels-community"


def cli(*args: str, site: Path | None = None, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items()
            if not k.startswith(("LOADSTONE_", "PYTHONWARNINGS", "TRANSFORMERS_VERBOSITY", "HF_HUB_VERBOSITY"))}
    if site is not None:
        full["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), full.get("PYTHONPATH")]))
    full.update(env)
    return subprocess.run([LOADSTONE_CLI, *args], env=full, capture_output=True, text=True, timeout=300)


@pytest.fixture
def forced_site(tmp_path) -> Path:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(FORCE_AVX512_BF16)
    return site


def _commands(sharded_llama: Path, llama_lora: Path, tmp_path: Path) -> dict[str, list[str]]:
    return {
        # accelerate: "Device 0 is not available" (several times) on a machine without that GPU
        "plan-for-a-gpu": ["plan", str(sharded_llama), "--max-memory", "cuda:0=1GB", "--max-memory", "cpu=10GB"],
        # accelerate: "Some parameters are on the meta device because they were offloaded ..."
        "load-with-offload": ["load", str(sharded_llama), "--placement", "sequential", "--max-memory", "cpu=300KB",
                              "--offload-folder", str(tmp_path / "offload")],
        # peft imports bitsandbytes (its import-time log line), and warns about a transformers deprecation
        "load-adapter": ["load", str(llama_lora), "--placement", "cpu"],
        "demo": ["demo", "--cache-dir", str(tmp_path / "demo")],
    }


@pytest.mark.slow
@pytest.mark.parametrize("command", ["plan-for-a-gpu", "load-with-offload", "load-adapter", "demo"])
def test_ordinary_commands_print_nothing_on_stderr(command, sharded_llama, llama_lora, tmp_path, forced_site):
    argv = _commands(sharded_llama, llama_lora, tmp_path)[command]
    done = cli(*argv, site=forced_site if command in ("plan-for-a-gpu", "load-adapter") else None)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert "loadstone" in done.stdout


@pytest.mark.slow
def test_verbose_shows_what_the_libraries_say(sharded_llama, llama_lora, tmp_path, forced_site):
    commands = _commands(sharded_llama, llama_lora, tmp_path)
    offload = cli(*commands["load-with-offload"], "--verbose")
    assert offload.returncode == 0 and "Some parameters are on the meta device" in offload.stderr
    # the line test_ordinary_commands_print_nothing_on_stderr[load-adapter] proves silenced; --debug
    # is --verbose plus tracebacks
    adapter = cli(*commands["load-adapter"], "--debug", site=forced_site)
    assert adapter.returncode == 0 and KERNELS_LINE in adapter.stderr


def test_quiet_mode_restores_the_callers_logging_and_warnings(sharded_llama, capsys):
    import logging
    import warnings

    from loadstone.cli import main

    before = (logging.getLogger().level, logging.getLogger("accelerate").level, list(warnings.filters),
              os.environ.get("TRANSFORMERS_VERBOSITY"))
    assert main(["plan", str(sharded_llama), "--placement", "cpu"]) == 0
    after = (logging.getLogger().level, logging.getLogger("accelerate").level, list(warnings.filters),
             os.environ.get("TRANSFORMERS_VERBOSITY"))
    assert after == before
    capsys.readouterr()


OWN_AND_LIBRARY_LINES = """
import logging, warnings
from loadstone.plugins import PluginLoadWarning
from loadstone.quiet import library_output

for verbose in (False, True):
    print(f"--- verbose={verbose}", file=__import__("sys").stderr)
    with library_output(verbose=verbose):
        warnings.warn("a library's advice", FutureWarning)
        warnings.warn("plugin x was skipped", PluginLoadWarning)
        logging.getLogger("accelerate.utils.modeling").warning("Device 0 is not available")
        logging.getLogger("loadstone.plugins").warning("loadstone's own line")
        logging.getLogger("loadstone.plugins").debug("loadstone's debug line")
"""


def test_loadstones_own_lines_stay_and_library_lines_wait_for_verbose(python_subprocess):
    done = python_subprocess(OWN_AND_LIBRARY_LINES, timeout=60)
    assert done.returncode == 0, done.stderr
    quiet, verbose = done.stderr.split("--- verbose=True")
    assert "plugin x was skipped" in quiet and "loadstone's own line" in quiet
    assert "a library's advice" not in quiet and "Device 0" not in quiet and "debug line" not in quiet
    for line in ("plugin x was skipped", "loadstone's own line", "a library's advice", "Device 0",
                 "loadstone's debug line"):
        assert line in verbose


# ------------------------------------------------------------------ --json on failure

def _error_object(done: subprocess.CompletedProcess) -> dict:
    found = json.loads(done.stdout)
    assert set(found) == {"error", "message", "file", "field", "expected", "found", "fix", "exit_code"}, found
    assert found["exit_code"] == done.returncode
    return found


@pytest.mark.slow
def test_json_failures_are_a_json_object_on_stdout(sharded_llama, tmp_path):
    done = cli("load", str(sharded_llama), "--adapter", str(tmp_path / "nope"), "--json")
    assert done.returncode == 2
    found = _error_object(done)
    assert found["error"] == "ResolutionError" and found["field"].startswith("adapters[")
    assert found["field"].endswith("(CLI: --adapter)")  # the option that named it, not "reference"
    assert found["file"] == str(tmp_path / "nope") and found["fix"]
    assert done.stderr.startswith("error (ResolutionError)") and len(done.stderr.strip().splitlines()) == 1

    usage = cli("plan", str(sharded_llama), "--max-memory", "lots", "--json")
    assert usage.returncode == 2
    assert _error_object(usage)["error"] == "usage" and "--max-memory" in _error_object(usage)["message"]

    plugins = cli("plugins", "--json", LOADSTONE_STRICT_PLUGINS="1", LOADSTONE_DISABLE_PLUGINS="nothing-by-this-name")
    assert plugins.returncode == 0 and isinstance(json.loads(plugins.stdout), list)  # success is the listing


@pytest.mark.parametrize("argv,error", [
    (["plan", "{ckpt}", "--dtype", "int3", "--json"], "OptionError"),
    (["plan", "{ckpt}", "--placement", "everywhere", "--json"], "ComponentNotFoundError"),
    (["plan", "{tmp}/missing", "--json"], "ResolutionError"),
    (["load", "{ckpt}", "--device-map", "{tmp}/missing.json", "--json"], "OptionError"),
    (["frobnicate", "--json"], "usage"),
])
def test_every_refusal_under_json_is_one_object(argv, error, sharded_llama, tmp_path, capsys):
    from loadstone.cli import main

    code = main([a.format(ckpt=sharded_llama, tmp=tmp_path) for a in argv])
    out, err = capsys.readouterr()
    found = json.loads(out)
    assert code == 2 and found["error"] == error and found["exit_code"] == 2
    assert found["message"] and found["fix"]
    assert err.startswith(f"error ({error})")


def test_a_missing_adapter_or_base_names_the_option_it_came_from(sharded_llama, llama_lora, tmp_path):
    import loadstone

    with pytest.raises(loadstone.ResolutionError) as info:
        loadstone.plan(str(sharded_llama), adapters={"math": str(tmp_path / "gone")})
    assert info.value.field == "adapters['math'] (CLI: --adapter)" and info.value.found == str(tmp_path / "gone")
    with pytest.raises(loadstone.ResolutionError) as info:
        loadstone.plan(str(llama_lora), base=str(tmp_path / "gone"))
    assert info.value.field == "base (CLI: --base)"
    with pytest.raises(loadstone.ResolutionError) as info:
        loadstone.plan(str(tmp_path / "gone"))
    assert info.value.field == "reference"


def test_gradient_checkpointing_uses_the_current_transformers_api(tiny_checkpoint):
    # transformers 5 deprecates gradient_checkpointing_enable (a FutureWarning on every trainable
    # load with gradient checkpointing); loadstone calls its successor
    import warnings

    import loadstone

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        model = loadstone.load(str(tiny_checkpoint("llama")), placement="cpu", gradient_checkpointing=True,
                               progress=False).model
    assert model.is_activation_checkpointing
