"""Discovery through the real entry point, cheap listing and planning (gptqmodel takes seconds to
import), the legacy config reader, and the kernel's pointer to this distribution."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import loadstone
from loadstone_gptq import GPTQBackend
from loadstone_gptq.settings import read_legacy

LIST_PLUGINS = """
import contextlib, io, json, sys
from loadstone.cli import main
out = io.StringIO()
with contextlib.redirect_stdout(out):
    rc = main(["plugins", "--json"])
print(json.dumps({"rc": rc, "plugins": json.loads(out.getvalue()),
                  "imported": sorted(m for m in ("gptqmodel", "optimum", "loadstone_gptq", "torch") if m in sys.modules)}))
"""

PLAN = """
import json, sys
import loadstone
report = loadstone.plan(sys.argv[1], placement="cpu").report
print(json.dumps({"kernel": report.quantization["kernel"], "engine": report.engine["name"],
                  "imported": sorted(m for m in ("gptqmodel", "optimum") if m in sys.modules)}))
"""


def run(code: str, *args: str) -> dict:
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_listed_through_the_entry_point_without_importing_gptqmodel():
    listing = run(LIST_PLUGINS)
    assert listing["rc"] == 0 and listing["imported"] == ["loadstone_gptq"]
    record = next(p for p in listing["plugins"] if p["distribution"] == "loadstone-gptq")
    assert record["status"] == "loaded" and record["entry_point"] == "loadstone_gptq.plugin"
    (component,) = record["components"]
    assert (component["name"], component["methods"], component["checkpoint_formats"]) == ("gptq", ["gptq"], ["gptq"])
    assert component["available"] is True and set(component["options"]) == {"backend"}


@pytest.mark.slow
def test_a_plan_does_not_import_gptqmodel(packed_checkpoint):
    folder, _, _ = packed_checkpoint(bits=4, group_size=32, desc_act=False, sym=True, v1=True, legacy=True)
    planned = run(PLAN, str(folder))
    assert planned["imported"] == [] and planned["engine"] == "loadstone"
    assert planned["kernel"] == {"backend": "gptq_torch", "reason": planned["kernel"]["reason"], "class": None}


def test_the_method_resolves_to_this_distribution():
    registration = loadstone.PluginManager().quantization_backend("gptq")
    assert registration.distribution == "loadstone-gptq" and isinstance(registration.component, GPTQBackend)
    assert GPTQBackend().environment_problems() == []


@pytest.mark.parametrize(("variable", "value", "said"), [
    ("LOADSTONE_DISABLE_PLUGINS", "gptq", "disabled by LOADSTONE_DISABLE_PLUGINS=gptq"),
    ("LOADSTONE_PLUGINS", "", "loadstone-gptq")])
def test_without_the_plugin_a_gptq_checkpoint_is_refused(packed_checkpoint, monkeypatch, variable, value, said):
    folder, _, _ = packed_checkpoint(bits=4, group_size=32, desc_act=False, sym=True, v1=True, legacy=False)
    monkeypatch.setenv(variable, value)
    with pytest.raises(loadstone.ComponentNotFoundError) as info:
        loadstone.plan(str(folder), placement="cpu", plugins=loadstone.PluginManager())
    assert said in info.value.fix and info.value.found == "gptq"
    assert "loading it as plain weights would be silently wrong" in info.value.message


@pytest.mark.parametrize(("config", "claimed"), [
    ({"quant_method": "gptq", "bits": 4}, True), ({"quant_method": "GPTQ"}, True),
    ({"quant_method": "awq", "bits": 4}, False), ({"quant_method": "bitsandbytes", "load_in_4bit": True}, False)])
def test_claims_gptq_checkpoints_only(config, claimed):
    assert GPTQBackend().claims_checkpoint(config) is claimed


def test_legacy_reader_normalises_auto_gptq_files(tmp_path):
    (tmp_path / "quantize_config.json").write_text(json.dumps(
        {"bits": 4, "group_size": 128, "damp_percent": 0.01, "desc_act": True, "static_groups": False, "sym": False,
         "true_sequential": True, "model_name_or_path": None, "model_file_base_name": "gptq_model-4bit-128g"}))
    found = read_legacy(tmp_path)
    assert found["quant_method"] == "gptq" and found["format"] == "gptq"
    assert (found["bits"], found["group_size"], found["desc_act"], found["sym"]) == (4, 128, True, False)
    assert found["meta"]["quantizer"] == ["auto_gptq (quantize_config.json)"]
    (tmp_path / "quantize_config.json").write_text(json.dumps({"quant_method": "awq", "bits": 4}))
    assert read_legacy(tmp_path) is None  # another method's file: not ours to read
    (tmp_path / "quantize_config.json").write_text("{broken")
    with pytest.raises(loadstone.ConfigError) as info:
        read_legacy(tmp_path)
    assert info.value.file.endswith("quantize_config.json") and "repair" in info.value.fix
    (tmp_path / "quantize_config.json").unlink()
    assert read_legacy(tmp_path) is None


def test_option_help_is_listed():
    assert "gptq_torch" in GPTQBackend().option_help()["backend"]
