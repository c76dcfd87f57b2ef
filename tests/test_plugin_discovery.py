"""Plugins as real distributions: installed with pip, discovered through the ``loadstone``
entry-point group by a fresh interpreter, listed, selected, skipped, refused.

The distributions live in tests/fixtures/dists; each is installed once per session into its own
``--target`` folder, and a subprocess sees the ones on its ``PYTHONPATH``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import loadstone

DISTS = Path(__file__).parent / "fixtures" / "dists"
LOADSTONE_CLI = str(Path(sys.executable).parent / "loadstone")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def installed(tmp_path_factory) -> dict[str, Path]:
    """dist name -> a --target folder holding only that distribution (built from a copy, so the
    source tree gets no build/ or egg-info)."""
    root = tmp_path_factory.mktemp("dists")

    def install(name: str) -> tuple[str, Path]:
        source, target = root / "src" / name, root / name
        shutil.copytree(DISTS / name, source)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                        "--no-input", "--target", str(target), str(source)], check=True, capture_output=True)
        return name, target

    with ThreadPoolExecutor(4) as pool:
        return dict(pool.map(install, ["loadstone-testplugin", "loadstone-broken", "loadstone-clash",
                                       "loadstone-extras"]))


def cli(*args: str, dists: list[Path] = (), **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("LOADSTONE_")}
    full["PYTHONPATH"] = os.pathsep.join(map(str, dists))
    full.update(env)
    return subprocess.run([LOADSTONE_CLI, *args], env=full, capture_output=True, text=True, timeout=120)


def plugins_json(*dists: Path, **env: str) -> tuple[dict[str, dict], str]:
    done = cli("plugins", "--json", dists=list(dists), **env)
    assert done.returncode == 0, done.stderr
    return {p["name"]: p for p in json.loads(done.stdout)}, done.stderr


def test_installed_plugin_is_discovered_and_listed_with_its_distribution(installed):
    listed, _ = plugins_json(installed["loadstone-testplugin"])
    entry = listed["testplugin"]
    assert (entry["distribution"], entry["version"], entry["status"]) == ("loadstone-testplugin", "0.3.1", "loaded")
    assert entry["builtin"] is False and entry["entry_point"] == "loadstone_testplugin"
    kinds = {(c["kind"], c["name"]) for c in entry["components"]}
    assert kinds == {("quantization", "testplugin-halfprec"), ("placement", "testplace")}
    backend = next(c for c in entry["components"] if c["kind"] == "quantization")
    assert backend["methods"] == ["halfprec"] and backend["available"] and "note" in backend["options"]
    assert listed["builtin-placement"]["distribution"] == "loadstone" and listed["builtin-placement"]["builtin"]

    text = cli("plugins", dists=[installed["loadstone-testplugin"]])
    assert text.returncode == 0
    assert "testplugin  [loadstone-testplugin 0.3.1, entry point]  loaded" in text.stdout
    assert "methods: halfprec" in text.stdout and "testplace" in text.stdout


def test_plugin_components_are_selected_by_name_in_a_load(installed, sharded_llama):
    done = cli("load", str(sharded_llama), "--quantization", "halfprec", "-o", "note=hello", "--placement",
               "testplace", "--json", "--quiet", dists=[installed["loadstone-testplugin"]])
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["dtype"] == "bfloat16"  # the backend's adjust_dtype ran
    q = report["quantization"]
    assert (q["backend"], q["distribution"], q["version"], q["method"]) == (
        "testplugin-halfprec", "loadstone-testplugin", "0.3.1", "halfprec")
    assert q["options"] == {"note": "hello"}
    decisions = {d["topic"]: d for d in report["decisions"]}
    assert decisions["placement"]["distribution"] == "loadstone-testplugin"
    assert decisions["placement"]["plugin"] == "testplugin"
    assert "testplace put every module on the CPU" in decisions["placement"]["reason"]
    assert decisions["dtype"]["by"] == "backend testplugin-halfprec"
    assert "halfprec prepared the model (note='hello')" in report["training"]["notes"]
    # the backend's estimate (2 bytes per element: parameters plus the small rotary buffer) was planned
    planned = report["placement"]["bytes_per_device"]["cpu"]
    assert 2 * report["parameters"]["total"] < planned < 2 * report["parameters"]["total"] + 64


def test_broken_plugin_is_skipped_with_a_warning_naming_its_distribution(installed):
    both = (installed["loadstone-broken"], installed["loadstone-testplugin"])
    listed, stderr = plugins_json(*both)
    assert "loadstone-broken" in stderr and "libfake.so.1 is missing" in stderr
    assert "LOADSTONE_STRICT_PLUGINS" in stderr
    broken = listed["broken"]
    assert broken["status"] == "failed" and "RuntimeError" in broken["error"]
    assert listed["testplugin"]["status"] == "loaded"  # the others still work


def test_broken_plugin_is_an_error_in_strict_mode(installed):
    done = cli("plugins", dists=[installed["loadstone-broken"]], LOADSTONE_STRICT_PLUGINS="1")
    assert done.returncode == 2
    assert "PluginLoadError" in done.stderr and "loadstone-broken" in done.stderr
    assert "libfake.so.1 is missing" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1  # one paragraph, no traceback


def test_allow_list(installed):
    dists = (installed["loadstone-testplugin"], installed["loadstone-broken"])
    only_builtins, stderr = plugins_json(*dists, LOADSTONE_PLUGINS="")
    assert only_builtins["testplugin"]["status"] == "not-allowed"
    assert only_builtins["broken"]["status"] == "not-allowed" and stderr == ""  # never imported
    assert {p["status"] for p in only_builtins.values() if p["builtin"]} == {"loaded"}
    # entry-point name, or distribution name in any spelling PEP 503 makes equal
    for allow in ("testplugin", "loadstone-testplugin", "Loadstone_TestPlugin", "loadstone.testplugin"):
        listed, _ = plugins_json(*dists, LOADSTONE_PLUGINS=allow)
        assert listed["testplugin"]["status"] == "loaded" and listed["broken"]["status"] == "not-allowed"


def test_disable_list_covers_third_party_and_builtin_plugins(installed):
    listed, _ = plugins_json(installed["loadstone-testplugin"], LOADSTONE_DISABLE_PLUGINS="testplugin")
    assert listed["testplugin"]["status"] == "disabled"
    listed, _ = plugins_json(LOADSTONE_DISABLE_PLUGINS="builtin-placement, loadstone-testplugin")
    assert listed["builtin-placement"]["status"] == "disabled"
    assert listed["builtin-resolvers"]["status"] == "loaded"


def test_disable_list_can_name_one_builtin_component(monkeypatch, sharded_llama, tmp_path):
    monkeypatch.setenv("LOADSTONE_DISABLE_PLUGINS", "hub")
    manager = loadstone.PluginManager()
    names = [r.name for r in manager.resolvers()]  # third-party resolvers may be installed too
    assert "hub" not in names and "local" in names
    record = next(r for r in manager.describe() if r["name"] == "builtin-resolvers")
    assert record["status"] == "loaded" and record["disabled_components"] == ["resolver hub"]
    with pytest.raises(loadstone.ResolutionError) as info:
        loadstone.plan("org/tiny", plugins=manager, cache_dir=str(tmp_path), offline=True)
    tried = info.value.fix.split("resolvers tried, in order: ", 1)[1].split(")", 1)[0].split(", ")
    assert tried == names  # every resolver left, in order: the Hub resolver is not among them
    assert "disabled by LOADSTONE_DISABLE_PLUGINS=hub: resolver hub" in info.value.fix
    assert loadstone.plan(str(sharded_llama), plugins=manager, placement="cpu").fits


def test_a_conflict_is_listed_and_every_load_refuses_naming_both_sides(installed, sharded_llama):
    both = [installed["loadstone-testplugin"], installed["loadstone-clash"]]
    listing = cli("plugins", dists=both)
    assert listing.returncode == 0, listing.stderr  # the listing still works ...
    assert "clash  [loadstone-clash 2.0.0, entry point]  conflict" in listing.stdout  # ... and shows it
    assert "testplugin  [loadstone-testplugin 0.3.1, entry point]  loaded" in listing.stdout
    (line,) = listing.stderr.strip().splitlines()
    assert line.startswith("error (PluginConflictError)")
    listed, _ = plugins_json(*both)
    assert listed["clash"]["status"] == "conflict" and "halfprec" in listed["clash"]["error"]

    done = cli("plan", str(sharded_llama), "--json", dists=both)
    assert done.returncode == 2
    error = json.loads(done.stdout)
    assert error["error"] == "PluginConflictError" and error["field"] == "quantization method"
    assert error["found"] == "halfprec"
    for part in ("the quantization method 'halfprec' (backends 'testplugin-halfprec' and 'clash-halfprec')",
                 "plugin 'testplugin' from loadstone-testplugin 0.3.1", "plugin 'clash' from loadstone-clash 2.0.0"):
        assert part in error["message"]
    for way in ("LOADSTONE_DISABLE_PLUGINS=clash", "LOADSTONE_DISABLE_PLUGINS=testplugin",
                "pip uninstall loadstone-clash", "pip uninstall loadstone-testplugin"):
        assert way in error["fix"]
    # either fix works
    for disabled, kept in (("clash", "testplugin"), ("testplugin", "clash")):
        listed, stderr = plugins_json(*both, LOADSTONE_DISABLE_PLUGINS=disabled)
        assert listed[disabled]["status"] == "disabled" and listed[kept]["status"] == "loaded" and stderr == ""


def test_missing_backend_names_the_distribution_that_provides_it(monkeypatch):
    monkeypatch.setenv("LOADSTONE_PLUGINS", "")  # excludes loadstone-bnb whether or not it is installed
    manager = loadstone.PluginManager()
    for method in ("nf4", "int8", "fp4"):
        with pytest.raises(loadstone.ComponentNotFoundError) as info:
            manager.quantization_backend(method)
        assert "loadstone-bnb" in str(info.value) and repr(method) in str(info.value)
    with pytest.raises(loadstone.ComponentNotFoundError) as info:
        manager.quantization_backend("gptq")
    assert "loadstone-gptq" in str(info.value)
    for spec in ("file", "file:map.yaml", "even", "layers:2", "fsdp", "fsdp:8"):
        with pytest.raises(loadstone.ComponentNotFoundError) as info:
            manager.placement_strategy(spec)
        assert "loadstone-devicemap" in str(info.value), spec
    with pytest.raises(loadstone.ComponentNotFoundError) as info:
        manager.engine("fsdp")
    assert "loadstone-devicemap" in str(info.value)


# The kernel's tests that consult the installed plugins (listings, component lookups, "choose one
# of" messages, reports naming who decided): they must not assume that only loadstone's own
# plugins are installed.
# (Those that build their manager with allow=[] see the built-ins only, whatever is installed.)
PLUGIN_SENSITIVE_TESTS = [
    "tests/test_cli.py", "tests/test_report.py",
    "tests/test_plugin_discovery.py::test_disable_list_can_name_one_builtin_component",
    "tests/test_plugin_discovery.py::test_missing_backend_names_the_distribution_that_provides_it",
]


def test_the_kernels_own_tests_pass_with_a_third_party_plugin_installed(installed, tmp_path):
    extras = installed["loadstone-extras"]
    listed, _ = plugins_json(extras, LOADSTONE_STRICT_PLUGINS="1")
    assert listed["extras"]["status"] == "loaded"
    assert {c["kind"] for c in listed["extras"]["components"]} == {"resolver", "placement", "quantization"}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOADSTONE_", "PYTEST_"))}
    env.update(PYTHONPATH=str(extras), LOADSTONE_STRICT_PLUGINS="1")  # strict: the plugin surely took part
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                           f"--basetemp={tmp_path / 'nested'}", *PLUGIN_SENSITIVE_TESTS],
                          cwd=Path(__file__).parents[1], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:]
    assert " passed" in done.stdout.splitlines()[-1] and "failed" not in done.stdout.splitlines()[-1]


@pytest.mark.parametrize("name", ["loadstone-bnb", "Loadstone_BNB", "loadstone.bnb", "a-_.b", "X", "a__b--c..d"])
def test_distribution_names_are_normalised_as_pep_503_says(name):
    from packaging.utils import canonicalize_name

    from loadstone.plugin_policy import canonical_distribution_name

    assert canonical_distribution_name(name) == canonicalize_name(name)


def _dist_info(folder: Path, name: str, version: str, entry_points: str | None) -> None:
    info = folder / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    if entry_points is not None:
        (info / "entry_points.txt").write_text(entry_points)


def test_the_entry_point_scan_finds_what_importlib_finds(tmp_path, monkeypatch):
    """installed_entry_points parses only distributions that mention the group; what it returns
    must still be importlib's answer: the same entry points, in the same order, a distribution on
    sys.path twice counted where it is found first (even where that copy has no such entry point)."""
    import importlib.metadata as md

    from loadstone.plugin_policy import installed_entry_points

    first, second = tmp_path / "first", tmp_path / "second"
    _dist_info(first, "demo_scan", "2.0", "[loadstone]\nnew = demo_scan.new\n")
    _dist_info(second, "Demo.Scan", "1.0", "[loadstone]\nold = demo_scan.old\n")  # shadowed: the same name
    _dist_info(first, "quiet_scan", "1.0", "[console_scripts]\nquiet = quiet_scan:main\n")  # shadows the next
    _dist_info(second, "quiet_scan", "0.9", "[loadstone]\nstale = quiet_scan.old\n")
    _dist_info(second, "mentions_scan", "1.0", "[console_scripts]\nloadstone-tool = mentions:main\n")
    _dist_info(second, "plain_scan", "1.0", None)
    _dist_info(second, "more_scan", "3.0", "[loadstone]\nb = more_scan.b\na = more_scan.a\n[other]\nx = y\n")
    monkeypatch.syspath_prepend(str(second))
    monkeypatch.syspath_prepend(str(first))

    def listed(eps) -> list[tuple[str, str, str, str]]:
        return [(ep.name, ep.value, ep.dist.name, ep.dist.version) for ep in eps if ep.dist.name.endswith(("scan", "Scan"))]

    for group in ("loadstone", "console_scripts", "other"):
        assert listed(installed_entry_points(group)) == listed(md.entry_points(group=group)), group
    assert listed(installed_entry_points("loadstone")) == [
        ("new", "demo_scan.new", "demo_scan", "2.0"), ("b", "more_scan.b", "more_scan", "3.0"),
        ("a", "more_scan.a", "more_scan", "3.0")]
