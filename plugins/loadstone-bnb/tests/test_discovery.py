"""Discovery through the real entry point, cheap listing, and environment problems that say the fix."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import loadstone
import loadstone_bnb
from loadstone_bnb import BitsAndBytesBackend

LIST_PLUGINS = """
import contextlib, io, json, sys
from loadstone.cli import main
out = io.StringIO()
with contextlib.redirect_stdout(out):
    rc = main(["plugins", "--json"])
print(json.dumps({"rc": rc, "plugins": json.loads(out.getvalue()),
                  "imported": sorted(m for m in ("bitsandbytes", "loadstone_bnb", "torch") if m in sys.modules)}))
"""


@pytest.fixture(scope="module")
def listing() -> dict:  # one subprocess shared by the listing tests
    done = subprocess.run([sys.executable, "-c", LIST_PLUGINS], capture_output=True, text=True, timeout=120,
                          check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_listing_plugins_does_not_import_bitsandbytes(listing):
    assert listing["rc"] == 0
    assert "loadstone_bnb" in listing["imported"]  # the plugin really was loaded ...
    assert "bitsandbytes" not in listing["imported"]  # ... without its heavy dependency


@pytest.mark.slow
def test_importing_the_package_imports_neither_torch_nor_bitsandbytes():
    code = "import sys, loadstone_bnb; print(sorted(m for m in ('torch', 'bitsandbytes') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == "[]"


def test_listed_through_the_entry_point_with_methods_and_options(listing):
    record = next(p for p in listing["plugins"] if p["distribution"] == "loadstone-bnb")
    assert record["status"] == "loaded" and record["entry_point"] == "loadstone_bnb.plugin"
    (component,) = record["components"]
    assert component["name"] == "bitsandbytes" and component["methods"] == ["nf4", "fp4", "int8"]
    assert component["checkpoint_formats"] == ["bitsandbytes"] and component["available"] is True
    assert set(component["options"]) == {"compute_dtype", "double_quant", "quant_storage", "keep_modules",
                                         "threshold", "cpu_offload", "upcast", "cpu_kernel", "cpu_quantizer"}


def test_methods_resolve_to_this_distribution():
    manager = loadstone.PluginManager()
    for method in ("nf4", "fp4", "int8"):
        assert manager.quantization_backend(method).distribution == "loadstone-bnb"


class OldBitsAndBytes(BitsAndBytesBackend):
    # The installed bitsandbytes (0.50) is real; demanding a future version makes it "too old".
    requirements = ("bitsandbytes>=99",)


class OldPlugin:
    @loadstone.hookimpl
    def loadstone_register_quantization_backends(self, register):
        register(OldBitsAndBytes())


def test_too_old_bitsandbytes_names_the_pip_command(plugin_manager, tiny_checkpoint):
    manager = plugin_manager(disable=["bnb"], extra_plugins=[("old-bnb", OldPlugin())])
    (entry,) = [c for p in manager.describe() for c in p["components"] if c["name"] == "bitsandbytes"]
    assert entry["available"] is False
    with pytest.raises(loadstone.QuantizationError) as info:
        loadstone.plan(str(tiny_checkpoint("llama")), quantization="nf4", plugins=manager)
    assert "bitsandbytes" in info.value.message and "is installed but bitsandbytes>=99 is needed" in info.value.message
    assert "pip install -U 'bitsandbytes>=99'" in info.value.fix


def test_the_real_requirement_is_met_here():
    assert BitsAndBytesBackend().environment_problems() == []


def test_disabled_plugin_is_named_when_its_method_is_asked_for(plugin_manager):
    with pytest.raises(loadstone.ComponentNotFoundError) as info:
        plugin_manager(disable=["bnb"]).quantization_backend("nf4")
    assert "loadstone-bnb" in info.value.fix


PLAN_WITHOUT_BITSANDBYTES = """
import json, sys
import loadstone
(entry,) = [c for p in loadstone.PluginManager().describe() for c in p["components"] if c["name"] == "bitsandbytes"]
try:
    loadstone.plan(sys.argv[1], quantization="nf4", placement="cpu")
    error = None
except loadstone.QuantizationError as exc:
    error = {"message": exc.message, "fix": exc.fix}
print(json.dumps({"listed": entry, "error": error}))
"""


@pytest.mark.slow
def test_missing_bitsandbytes_names_the_pip_command(tmp_path, tiny_checkpoint):
    # A real environment without bitsandbytes: the venv's packages minus bitsandbytes, seen through
    # symlinks by an interpreter started without site (-S); loadstone and this plugin come from source.
    view = tmp_path / "site-packages"
    view.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not entry.name.lower().startswith("bitsandbytes"):
            (view / entry.name).symlink_to(entry)
    path = [str(view), str(Path(loadstone.__file__).parents[1]), str(Path(loadstone_bnb.__file__).parents[1])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    done = subprocess.run([sys.executable, "-S", "-c", PLAN_WITHOUT_BITSANDBYTES, str(tiny_checkpoint("llama"))],
                          capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["listed"]["available"] is False
    assert found["listed"]["problems"] == ["bitsandbytes is not installed (pip install 'bitsandbytes>=0.46')"]
    assert "cannot run here: bitsandbytes is not installed" in found["error"]["message"]
    assert found["error"]["fix"] == "bitsandbytes is not installed (pip install 'bitsandbytes>=0.46')"


PLAN_FOR_A_GPU = """
import json, sys
import loadstone
plan = loadstone.plan(sys.argv[1], quantization="nf4", placement="auto", max_memory={"cuda:0": "80GiB"})
print(json.dumps({"map": {k: str(v) for k, v in plan.device_map.items()}, "bnb": "bitsandbytes" in sys.modules}))
"""


def test_planning_for_a_gpu_does_not_import_bitsandbytes(tiny_checkpoint):
    # importing bitsandbytes sets up torch.compile and costs seconds: a plan must not pay for it
    done = subprocess.run([sys.executable, "-c", PLAN_FOR_A_GPU, str(tiny_checkpoint("llama"))],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"map": {"": "0"}, "bnb": False}
