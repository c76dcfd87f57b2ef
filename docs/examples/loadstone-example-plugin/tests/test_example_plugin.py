"""Tests for loadstone-example-plugin, written with the fixtures loadstone ships for plugin authors.

``tiny_checkpoint``, ``tiny_adapter``, ``plugin_manager`` and ``loadstone_conformance`` (the
conformance kit) come from ``loadstone.pytest_plugin``, which pytest picks up automatically wherever
loadstone is installed.
"""

import json

import pytest

import loadstone
from loadstone_example_plugin import audit, catalog, placement

PLUGINS = [("example-catalog", catalog), ("example-audit", audit), ("example-placement", placement)]


@pytest.fixture
def manager(plugin_manager):
    # allow=[]: no installed entry points, only the built-ins and exactly these modules. Without
    # it, an installed copy of this distribution would register the same components twice.
    return plugin_manager(allow=[], extra_plugins=PLUGINS)


@pytest.fixture
def catalog_file(tmp_path, monkeypatch, tiny_checkpoint, tiny_adapter):
    path = tmp_path / "models.toml"
    # The adapter names its base as catalog://tiny-llama, so both resolve through the catalog.
    adapter = tiny_adapter("llama", base_reference="catalog://tiny-llama")
    path.write_text(f'[models]\ntiny-llama = "{tiny_checkpoint("llama")}"\n'
                    f'[models.tiny-lora]\npath = "{adapter}"\nowner = "search-team"\n')
    monkeypatch.setenv(catalog.ENV_VAR, str(path))
    return path


def test_each_module_registers_its_component():
    # The registration hooks are plain functions: call them with a list's append as `register`.
    registered = []
    catalog.loadstone_register_resolvers(registered.append)
    placement.loadstone_register_placement_strategies(registered.append)
    assert [(type(c).__name__, c.name) for c in registered] == [
        ("CatalogResolver", "catalog"), ("MemoryFractionPlacement", "memory-fraction")]
    assert placement.MemoryFractionPlacement().matches("memory-fraction:80%")


def test_entry_points_are_declared(plugin_manager):
    # Needs the distribution installed (pip install -e .): reads its real entry points.
    records = {r.name: r for r in plugin_manager(allow=["loadstone-example-plugin"]).records}
    for name, _ in PLUGINS:
        assert records[name].status == "loaded", records[name].error
        assert records[name].distribution == "loadstone-example-plugin"


def test_catalog_reference_loads_the_listed_folder(manager, catalog_file, tiny_checkpoint):
    result = loadstone.load("catalog://tiny-llama", placement="cpu", plugins=manager, progress=False)
    base = result.report.sources["base"]
    assert (base["kind"], base["resolver"]) == ("catalog", "catalog")
    assert base["path"] == str(tiny_checkpoint("llama").resolve())
    assert base["extra"] == {"catalog": str(catalog_file), "entry": "tiny-llama"}


def test_catalog_adapter_finds_its_base_in_the_catalog_too(manager, catalog_file):
    result = loadstone.load("catalog://tiny-lora", placement="cpu", plugins=manager, progress=False)
    sources = result.report.sources
    assert sources["adapters"][0]["source"]["extra"]["owner"] == "search-team"
    assert sources["base"]["reference"] == "catalog://tiny-llama"
    assert sources["base"]["extra"]["entry"] == "tiny-llama"
    assert [a["name"] for a in result.report.adapters] == ["default"]


def test_relative_paths_are_taken_from_the_catalog_folder(tmp_path, monkeypatch, manager, tiny_checkpoint):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "llama").symlink_to(tiny_checkpoint("llama"), target_is_directory=True)
    (tmp_path / "models.json").write_text(json.dumps({"models": {"llama": {"path": "models/llama"}}}))
    monkeypatch.setenv(catalog.ENV_VAR, str(tmp_path / "models.json"))
    monkeypatch.chdir("/")
    plan = loadstone.plan("catalog://llama", plugins=manager)
    assert plan.sources.base.path == tiny_checkpoint("llama").resolve()


@pytest.mark.parametrize("reference, content, message", [
    ("catalog://tiny-lama", '[models]\ntiny-llama = "/nowhere"\n', "did you mean 'tiny-llama'"),
    ("catalog://gone", '[models]\ngone = "/nowhere/at/all"\n', "which is not a folder"),
    ("catalog://x", '[models]\nx = 3\n', "has no path"),
    ("catalog://x", 'models = [', "not valid TOML/JSON"),
    ("catalog://../etc", '[models]\n', "not a valid catalog reference"),
])
def test_catalog_errors_name_the_file_and_the_fix(tmp_path, monkeypatch, manager, reference, content, message):
    path = tmp_path / "models.toml"
    path.write_text(content)
    monkeypatch.setenv(catalog.ENV_VAR, str(path))
    with pytest.raises(loadstone.ResolutionError, match=message) as info:
        loadstone.plan(reference, plugins=manager)
    assert info.value.fix


def test_catalog_without_env_var_says_which_variable(monkeypatch, manager):
    monkeypatch.delenv(catalog.ENV_VAR, raising=False)
    with pytest.raises(loadstone.ResolutionError, match=catalog.ENV_VAR):
        loadstone.plan("catalog://anything", plugins=manager)


def test_audit_log_records_loads_and_failures(tmp_path, monkeypatch, manager, tiny_checkpoint):
    log = tmp_path / "audit.jsonl"
    monkeypatch.setenv(audit.ENV_VAR, str(log))
    loadstone.load(str(tiny_checkpoint("llama")), placement="cpu", plugins=manager, progress=False)
    with pytest.raises(loadstone.ResolutionError):
        loadstone.load(str(tmp_path / "missing"), plugins=manager, progress=False)
    first, second = [json.loads(line) for line in log.read_text().splitlines()]
    assert first["event"] == "load" and first["placement"] == "cpu"
    assert first["base"]["path"] == str(tiny_checkpoint("llama").resolve())
    assert first["parameters"]["total"] > 0
    assert second["event"] == "load_failed"
    assert (second["stage"], second["error"]) == ("resolve", "ResolutionError")


def test_audit_log_is_off_without_env_var(tmp_path, monkeypatch, manager, tiny_checkpoint):
    monkeypatch.delenv(audit.ENV_VAR, raising=False)
    monkeypatch.chdir(tmp_path)
    loadstone.load(str(tiny_checkpoint("llama")), placement="cpu", plugins=manager, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_memory_fraction_spills_what_does_not_fit(tmp_path, manager, tiny_checkpoint):
    ckpt = tiny_checkpoint("llama")
    full = loadstone.plan(str(ckpt), placement="cpu", plugins=manager).bytes_per_device["cpu"]
    budget = {"cpu": int(full * 1.2)}
    auto = loadstone.plan(str(ckpt), max_memory=budget, plugins=manager)
    half = loadstone.plan(str(ckpt), placement="memory-fraction:50%", max_memory=budget,
                          offload_folder=str(tmp_path / "offload"), plugins=manager)
    assert set(auto.bytes_per_device) == {"cpu"}
    assert half.bytes_per_device["cpu"] <= budget["cpu"] * 0.5
    assert half.bytes_per_device["disk"] > 0
    decision = half.report.decision("placement")
    assert decision.plugin == "example-placement" and "50%" in decision.reason


def test_memory_fraction_rejects_a_bad_fraction(manager, tiny_checkpoint):
    with pytest.raises(loadstone.PlacementError, match="0 < F <= 1"):
        loadstone.plan(str(tiny_checkpoint("llama")), placement="memory-fraction:1.5", plugins=manager)


# The conformance kit runs the contract's checks on the installed distribution (its real entry
# points: the kit also lists plugins in a fresh interpreter and checks nothing heavy is imported).
@pytest.fixture
def installed(plugin_manager):
    return plugin_manager(allow=["loadstone-example-plugin"])


def test_catalog_resolver_conforms(loadstone_conformance, installed, catalog_file):
    report = loadstone_conformance.resolver(
        "catalog", plugins=installed, distribution="loadstone-example-plugin",
        own=["catalog://tiny-llama", "catalog://tiny-lora"], broken=["catalog://tiny-lama", "catalog://../etc"])
    report.assert_ok()


def test_memory_fraction_placement_conforms(loadstone_conformance, installed):
    # A 1 MB budget, half of it used: the larger tiny models spill to disk, hence the offload folder.
    report = loadstone_conformance.placement(
        "memory-fraction:0.5", plugins=installed, distribution="loadstone-example-plugin",
        load_kwargs={"max_memory": {"cpu": "1MB"}}, offload=True)
    report.assert_ok()

