"""Plugin conflicts and the disable list, with plugins passed in Python (``extra_plugins``): a
conflict is listed and named exactly, the disable list applies to every plugin, and every message
says where a disable came from. (Entry-point plugins: tests/test_plugin_discovery.py.)"""

from __future__ import annotations

import pytest

import loadstone
from loadstone import hookimpl


class AnotherLocal(loadstone.Resolver):
    name = "local"  # the built-in resolver's name

    def resolve(self, reference, ctx):
        return None


class ResolverClash:
    @hookimpl
    def loadstone_register_resolvers(self, register):
        register(AnotherLocal())


class Half(loadstone.QuantizationBackend):
    methods = ("half", "quarter")

    def __init__(self, name: str, methods: tuple[str, ...] = ("half", "quarter")):
        self.name, self.methods = name, methods

    def transformers_config(self, ctx):
        return None


class Backends:
    def __init__(self, *backends: Half):
        self.backends = backends

    @hookimpl
    def loadstone_register_quantization_backends(self, register):
        for backend in self.backends:
            register(backend)


def test_a_component_name_conflict_is_listed_and_named_exactly(plugin_manager):
    manager = plugin_manager(allow=[], disable=[], extra_plugins=[("site-resolvers", ResolverClash())])
    listed = {r.name: r for r in manager.records}  # listing works despite the conflict
    assert listed["builtin-resolvers"].status == "loaded" and listed["site-resolvers"].status == "conflict"
    with pytest.raises(loadstone.PluginConflictError) as info:
        manager.resolvers()
    error = info.value
    text = str(error)
    assert "the resolver name 'local'" in text and error.field == "resolver name" and error.found == "local"
    # who: the built-in with its distribution, the in-process plugin with what it is
    assert "plugin 'builtin-resolvers' from loadstone" in text
    assert "plugin 'site-resolvers' (<in-process>, object of tests.test_plugin_conflicts.ResolverClash" in text
    # both ways out, in the form this manager reads its disable list (an argument here)
    assert "PluginManager(disable=['site-resolvers'])" in error.fix
    assert "PluginManager(disable=['builtin-resolvers'])" in error.fix
    assert "drop 'site-resolvers' from extra_plugins" in error.fix
    assert "disable the built-in 'builtin-resolvers' to replace it" in error.fix
    assert listed["site-resolvers"].error == text.replace("\n", " ")
    # every use refuses, the same way, until it is resolved; the conflict itself is kept
    for use in (lambda: manager.placement_strategy("cpu"), lambda: manager.quantization_backend("none"),
                lambda: loadstone.plan("./anything", plugins=manager)):
        with pytest.raises(loadstone.PluginConflictError) as again:
            use()
        assert str(again.value) == text
    assert [str(c) for c in manager.conflicts] == [text]


def test_a_method_conflict_names_the_methods_and_both_backends(plugin_manager, monkeypatch):
    monkeypatch.setenv("LOADSTONE_DISABLE_PLUGINS", "hub")  # disable list from the environment
    first, second = Backends(Half("halfer")), Backends(Half("halving", ("quarter", "half", "third")))
    manager = plugin_manager(allow=[], extra_plugins=[("one", first), ("two", second)])
    (error,) = manager.conflicts
    text = str(error)
    assert "the quantization methods 'half', 'quarter' (backends 'halfer' and 'halving')" in text
    assert error.field == "quantization method" and error.found == "half, quarter"
    assert "LOADSTONE_DISABLE_PLUGINS=hub,two" in error.fix and "LOADSTONE_DISABLE_PLUGINS=hub,one" in error.fix
    assert "PluginManager(disable" not in error.fix  # the variable is what this manager reads


def test_one_plugin_registering_a_name_twice_is_named_as_such(plugin_manager):
    manager = plugin_manager(allow=[], extra_plugins=[("twice", Backends(Half("same", ("a",)), Half("same", ("b",))))])
    (error,) = manager.conflicts
    assert "plugin 'twice'" in str(error) and "registers the quantization backend name 'same' twice" in str(error)


def test_resolving_the_conflict_by_disabling_either_side(plugin_manager):
    for disabled, winner in (("site-resolvers", "builtin-resolvers"), ("builtin-resolvers", "site-resolvers")):
        manager = plugin_manager(allow=[], disable=[disabled], extra_plugins=[("site-resolvers", ResolverClash())])
        assert not manager.conflicts
        assert next(r for r in manager.resolvers() if r.name == "local").plugin == winner


class Extra(loadstone.PlacementStrategy):
    name = "extra-place"

    def place(self, ctx):
        return {"": "cpu"}


class ExtraPlugin:
    @hookimpl
    def loadstone_register_placement_strategies(self, register):
        register(Extra())


@pytest.mark.parametrize("source", ["argument", "environment"])
def test_the_disable_list_applies_to_plugins_passed_in_python(source, plugin_manager, monkeypatch):
    if source == "environment":
        monkeypatch.setenv("LOADSTONE_DISABLE_PLUGINS", "extra")
        manager = plugin_manager(allow=[], extra_plugins=[("extra", ExtraPlugin())])
        where = "LOADSTONE_DISABLE_PLUGINS=extra"
    else:
        monkeypatch.setenv("LOADSTONE_DISABLE_PLUGINS", "something-else")  # ignored: the argument replaces it
        manager = plugin_manager(allow=[], disable=["extra"], extra_plugins=[("extra", ExtraPlugin())])
        where = "PluginManager(disable=['extra'])"
    record = next(r for r in manager.records if r.name == "extra")
    assert record.status == "disabled" and record.value == "object of tests.test_plugin_conflicts.ExtraPlugin"
    assert "extra-place" not in {r.name for r in manager.components("placement")}
    with pytest.raises(loadstone.ComponentNotFoundError) as info:
        manager.placement_strategy("extra-place")
    assert manager.disable_source == where
    # a name nobody provides: the message says what the disable list switched off, and where it came from
    assert f"disabled by {where}: plugin extra" in manager.disabled_summary()


def test_a_disabled_component_asked_for_by_name_says_where_it_was_disabled(plugin_manager, monkeypatch):
    monkeypatch.setenv("LOADSTONE_DISABLE_PLUGINS", "cpu")
    with pytest.raises(loadstone.ComponentNotFoundError) as info:
        plugin_manager(allow=[]).placement_strategy("cpu")
    assert "it is disabled by LOADSTONE_DISABLE_PLUGINS=cpu" in info.value.fix
    with pytest.raises(loadstone.ComponentNotFoundError) as info:
        plugin_manager(allow=[], disable=["cpu"]).placement_strategy("cpu")
    assert "it is disabled by PluginManager(disable=['cpu'])" in info.value.fix


@pytest.mark.parametrize("disable", [["builtin-resolvers"], ["local", "hub"]], ids=["plugin", "components"])
def test_no_resolver_left_says_the_disable_list_removed_them(disable, plugin_manager, sharded_llama):
    manager = plugin_manager(allow=[], disable=disable)
    with pytest.raises(loadstone.ResolutionError) as info:
        loadstone.plan(str(sharded_llama), plugins=manager)
    fix = info.value.fix
    assert "resolvers tried, in order: none" in fix and f"disabled by PluginManager(disable={sorted(disable)!r})" in fix
    assert all(name in fix for name in disable)


def test_an_in_process_plugin_that_crashes_is_named_by_what_it_is(plugin_manager, sharded_llama):
    class Crashes:
        @hookimpl
        def loadstone_after_plan(self, plan, request):
            raise KeyError("boom")

    manager = plugin_manager(allow=[], extra_plugins=[("audit", Crashes())])
    with pytest.raises(loadstone.PluginHookError) as info:
        loadstone.plan(str(sharded_llama), plugins=manager)
    text = str(info.value)
    assert "plugin 'audit' (<in-process>, object of tests.test_plugin_conflicts." in text
    assert "Crashes, passed as extra_plugins)" in text and "LOADSTONE_DISABLE_PLUGINS=audit" in info.value.fix
