"""``import loadstone`` and listing plugins import no heavy library (checked in a fresh interpreter)."""

from __future__ import annotations

import json

import pytest

HEAVY = ["torch", "transformers", "bitsandbytes", "peft", "accelerate", "gptqmodel", "safetensors"]

CHECK = f"""
import contextlib, io, json, sys
import loadstone
after_import = sorted(m for m in {HEAVY!r} if m in sys.modules)
loadstone.LoadRequest, loadstone.PlacementStrategy, loadstone.QuantizationBackend  # public names, no torch
from loadstone.cli import main
out = io.StringIO()
with contextlib.redirect_stdout(out):
    json_code = main(["plugins", "--json"])
    text_code = main(["plugins"])
    help_code = None
    try:
        main(["load", "--help"])
    except SystemExit as exc:
        help_code = exc.code
listed = json.loads(out.getvalue().split("\\n]\\n", 1)[0] + "\\n]")
print(json.dumps({{"after_import": after_import,
                  "after_plugins": sorted(m for m in {HEAVY!r} if m in sys.modules),
                  "codes": [json_code, text_code, help_code],
                  "plugins": {{p["name"]: p["status"] for p in listed}}}}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("allow", [None, ""], ids=["every-installed-plugin", "built-ins-only"])
def test_import_and_plugin_listing_stay_light(allow, python_subprocess):
    env = {} if allow is None else {"LOADSTONE_PLUGINS": allow}
    done = python_subprocess(CHECK, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["after_import"] == [], seen
    assert seen["after_plugins"] == [], seen  # describing backends reads metadata only
    assert seen["codes"] == [0, 0, 0]
    assert seen["plugins"]["builtin-placement"] == "loaded"


LOAD_WITHOUT_EXTRAS = """
import json, sys
import loadstone
seen = {{}}
for checkpoint in {checkpoints!r}:
    for engine in ("loadstone", "transformers"):
        for kwargs in ({{"trainable": True, "gradient_checkpointing": True}}, {{"trainable": False}}):
            loadstone.load(checkpoint, dtype="bfloat16", placement="cpu", engine=engine, progress=False, **kwargs)
            seen[f"{{checkpoint}} {{engine}} {{sorted(kwargs)}}"] = sorted(
                m for m in ("bitsandbytes", "peft") if m in sys.modules)
print(json.dumps(seen))
"""


@pytest.mark.slow
def test_an_unquantized_load_without_adapters_imports_neither_peft_nor_bitsandbytes(tiny_checkpoint,
                                                                                      python_subprocess):
    # peft imports bitsandbytes, which sets up torch.compile: 5-8 s a plain load must not pay
    checkpoints = [str(tiny_checkpoint(arch)) for arch in ("llama", "qwen2_moe")]
    done = python_subprocess(LOAD_WITHOUT_EXTRAS.format(checkpoints=checkpoints), timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(seen) == 8 and all(imported == [] for imported in seen.values()), seen


PLAN_NF4_FOR_CUDA = """
import json, sys
import loadstone
plan = loadstone.plan({checkpoint!r}, quantization="nf4", placement="auto", max_memory={{"cuda:0": "8GiB"}})
print(json.dumps({{"method": plan.quantization.method, "map": {{k: str(v) for k, v in plan.device_map.items()}},
                  "imported": sorted(m for m in ("bitsandbytes", "peft") if m in sys.modules)}}))
"""


@pytest.mark.slow
def test_planning_nf4_for_cuda_imports_no_quantization_library(tiny_checkpoint, python_subprocess):
    pytest.importorskip("loadstone_bnb", reason="nf4 comes from plugins/loadstone-bnb, which ./dev installs")
    done = python_subprocess(PLAN_NF4_FOR_CUDA.format(checkpoint=str(tiny_checkpoint("llama"))), timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found == {"method": "nf4", "map": {"": "0"}, "imported": []}


IMPORT_TIMES = """
import json, sys, time
import loadstone
stages = []
for _ in range(2):
    start = time.perf_counter()
    report = loadstone.load({checkpoint!r}, placement="cpu", progress=False).report
    stages.append({{**report.stages, "wall": time.perf_counter() - start}})
print(json.dumps(stages))
"""


@pytest.mark.slow
def test_import_time_is_its_own_entry_not_a_stage(tiny_checkpoint, python_subprocess):
    # A fresh interpreter: the first load imports torch and transformers, the second imports nothing.
    done = python_subprocess(IMPORT_TIMES.format(checkpoint=str(tiny_checkpoint("llama"))), timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    first, second = json.loads(done.stdout.strip().splitlines()[-1])
    assert first["imports"] > 0.2 and second["imports"] < 0.05, (first, second)
    # No stage of the first load is charged the seconds of importing torch and transformers (for
    # this 450 KiB model "inspect 5.19 s" before), and nothing is lost: the entries add up to the
    # wall time of the call.
    stages = {k: v for k, v in first.items() if k not in ("imports", "wall")}
    assert max(stages.values()) < min(1.0, first["imports"]), first
    accounted = sum(v for k, v in first.items() if k != "wall")
    assert accounted <= first["wall"] and accounted > 0.9 * first["wall"] - 0.05, first


ADAPTER_WITHOUT_GPTQMODEL = """
import json, os, sys
import loadstone
environment = dict(os.environ)
result = loadstone.load({adapter!r}, placement="cpu", progress=False)
print(json.dumps({{"peft": type(result.model).__name__, "gptqmodel": "gptqmodel" in sys.modules,
                  "environment_changed": sorted(k for k in os.environ if os.environ[k] != environment.get(k))}}))
"""


@pytest.mark.slow
def test_an_adapter_load_does_not_import_an_unused_gptqmodel(tiny_adapter, python_subprocess):
    """peft imports gptqmodel for every layer it wraps when gptqmodel is installed (seconds, a banner,
    and process-wide environment such as PYTORCH_ALLOC_CONF); a model without gptqmodel layers
    does not need it, in the plan's adapter check or in the load."""
    import importlib.util

    if importlib.util.find_spec("gptqmodel") is None:
        pytest.skip("gptqmodel is not installed here, so peft cannot import it either (./dev installs it)")
    done = python_subprocess(ADAPTER_WITHOUT_GPTQMODEL.format(adapter=str(tiny_adapter("llama"))), timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found == {"peft": "PeftModelForCausalLM", "gptqmodel": False, "environment_changed": []}
