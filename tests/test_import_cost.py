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
