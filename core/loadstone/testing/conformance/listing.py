"""The check every kit shares: a fresh interpreter runs ``loadstone plugins --json`` and the
component is listed, from its distribution, without a heavy library imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any


# Imported by none of loadstone's listing code; a plugin that imports one while registering makes
# every `loadstone plugins` and every `import` of a plugin manager pay for it (torch alone takes
# seconds, bitsandbytes sets up torch.compile).
HEAVY_MODULES = ("torch", "transformers", "peft", "accelerate", "safetensors", "bitsandbytes", "gptqmodel",
                 "auto_gptq", "optimum", "triton")

_LIST = r"""
import contextlib, io, json, sys
from loadstone.cli import main
out = io.StringIO()
with contextlib.redirect_stdout(out):
    code = main(["plugins", "--json"])
print(json.dumps({"code": code, "plugins": json.loads(out.getvalue()), "modules": sorted(sys.modules)}))
"""


def list_plugins_in_fresh_process(distribution: str, timeout: float = 180) -> dict[str, Any]:
    """``loadstone plugins --json`` in a new interpreter that sees what this one sees (its
    ``sys.path``), with the built-ins and ``distribution`` allowed (``LOADSTONE_PLUGINS``)
    so that other installed plugins neither hide nor cause heavy imports. Returns the exit
    code, the listing and every module the interpreter imported."""
    env = {k: v for k, v in os.environ.items() if k not in ("LOADSTONE_DISABLE_PLUGINS", "LOADSTONE_STRICT_PLUGINS")}
    env["LOADSTONE_PLUGINS"] = distribution
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    done = subprocess.run([sys.executable, "-c", _LIST], capture_output=True, text=True, timeout=timeout, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"`loadstone plugins --json` exited with {done.returncode}: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def same_distribution(a: str, b: str) -> bool:
    """Distribution names compared as pip compares them (``loadstone_bnb`` is ``loadstone-bnb``)."""
    from ...plugin_policy import canonical_distribution_name

    return canonical_distribution_name(a) == canonical_distribution_name(b)


def check_listing(kit: Any, result: Any) -> None:
    """The ``listing`` check of every kit (``result`` is the check's ``CheckResult``)."""
    reg = kit.registration
    if reg.distribution == "<in-process>":
        result.skip("registered in-process (PluginManager(extra_plugins=...)): only an installed distribution "
                    "is seen by a fresh `loadstone plugins --json`")
        return
    listing = list_plugins_in_fresh_process(reg.distribution)
    result.expect(listing["code"] == 0, f"`loadstone plugins --json` returned {listing['code']}")
    records = [p for p in listing["plugins"] if same_distribution(p["distribution"], reg.distribution)]
    result.expect(records, f"no plugin of distribution {reg.distribution!r} is listed")
    for record in records:
        result.expect(record["status"] == "loaded", f"plugin {record['name']!r} is {record['status']}: "
                                                    f"{record.get('error')}")
    entries = [c for r in records for c in r["components"] if (c["kind"], c["name"]) == (reg.kind, reg.name)]
    if result.expect(entries, f"{reg.kind} {reg.name!r} is not among the listed components of {reg.distribution}"):
        entry = entries[0]
        if reg.kind == "quantization":
            result.expect(entry.get("available") is True,
                          f"listed as unavailable here: {entry.get('problems')}")
        result.record("listed", entry)
    heavy = set(HEAVY_MODULES) | set(kit.heavy_modules)
    imported = sorted(m for m in listing["modules"] if m.split(".")[0] in heavy)
    roots = sorted({m.split(".")[0] for m in imported})
    result.expect(not roots, f"listing plugins imported {', '.join(roots)} (import heavy libraries inside the "
                             f"component's methods, not at module level or in the registration hook)")
    result.record("heavy_modules_checked", sorted(heavy))
    roots = {m.split(".")[0] for m in listing["modules"] if not m.startswith("_")}
    result.record("imported_plugin_modules", sorted(roots - _stdlib() - {"loadstone", "pluggy", "packaging", "platformdirs"}))


def _stdlib() -> set[str]:
    return set(getattr(sys, "stdlib_module_names", ())) | set(sys.builtin_module_names)
