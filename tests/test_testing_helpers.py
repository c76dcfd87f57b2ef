"""loadstone.testing.plugins_with: installed plugins as they are, a source tree registered in-process."""

from __future__ import annotations

from pathlib import Path

import pytest

import loadstone
from loadstone.testing import plugins_with

INT8WO_SOURCE = Path(__file__).parent / "fixtures" / "dists" / "loadstone-int8wo"


def test_a_method_nobody_installed_comes_from_the_module_in_process(monkeypatch):
    monkeypatch.syspath_prepend(str(INT8WO_SOURCE))  # importable, but no entry point declared
    with pytest.raises(loadstone.ComponentNotFoundError):
        loadstone.PluginManager().quantization_backend("int8wo")
    found = plugins_with("int8wo", "loadstone_int8wo.plugin", "int8wo")
    registration = found.quantization_backend("int8wo")
    assert (registration.plugin, registration.distribution) == ("int8wo", "<in-process>")


def test_a_method_already_provided_keeps_the_environment_as_it_is():
    found = plugins_with("none", "loadstone_no_such_module.plugin", "never-imported")
    assert found.quantization_backend("none").plugin != "never-imported"


def test_a_missing_module_is_an_import_error():
    with pytest.raises(ImportError):
        plugins_with("no-such-method", "loadstone_no_such_module.plugin", "x")


def test_the_shell_helpers_print_only_the_folder_on_stdout(tmp_path):
    # `$(python -m loadstone.testing adapter ...)` in a shell: a library's banner (gptqmodel's,
    # printed when peft imports it) must not land in what the shell captures
    import subprocess
    import sys

    def run(*args: str) -> list[str]:
        done = subprocess.run([sys.executable, "-m", "loadstone.testing", *args], cwd=tmp_path,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout.splitlines()

    assert run("checkpoint", "llama", "tiny-llama") == ["tiny-llama"]
    assert run("adapter", "tiny-llama", "tiny-lora", "--base-reference", "../tiny-llama") == ["tiny-lora"]
