"""The conformance kit fails components that break the contract: each check here meets a real
component with one real defect (registered in-process, like a plugin under development) and must
report it, naming what it found."""

from __future__ import annotations

import sys

import pytest

import loadstone
from loadstone import PlacementStrategy, QuantizationBackend, ResolvedSource, Resolver, set_module_tensor
from loadstone.engines.native import NativeEngine
from loadstone.testing import conformance


class HalfLinear(QuantizationBackend):
    """Stores the weights of plain ``nn.Linear`` layers (lm_head kept) in float16, converted in
    ``load_tensor``: a small but real converting backend."""

    name = "conformance-half"
    methods = ("half-linear",)

    def converts_tensor(self, module_name, param_name, module, ctx):
        import torch

        return param_name == "weight" and type(module) is torch.nn.Linear and module_name != "lm_head"

    def parameter_bytes(self, module_name, param_name, tensor, module, ctx):
        if self.converts_tensor(module_name, param_name, module, ctx):
            return tensor.numel() * 2
        return tensor.numel() * tensor.element_size()

    def load_tensor(self, module_name, module, name, tensor, ctx):
        import torch

        if self.converts_tensor(module_name, name, module, ctx):
            tensor = tensor.to(torch.float16)
        set_module_tensor(module, name, tensor)


class Underestimates(HalfLinear):
    name, methods = "conformance-under", ("under",)

    def parameter_bytes(self, module_name, param_name, tensor, module, ctx):
        return super().parameter_bytes(module_name, param_name, tensor, module, ctx) / 2


class ForgetsWhatIsInFlight(HalfLinear):
    name, methods = "conformance-no-transient", ("no-transient",)

    def transient_bytes(self, module_name, param_name, tensor, module, ctx):
        return 0.0


class TakesAnyOption(HalfLinear):
    name, methods = "conformance-any-option", ("any-option",)

    def normalize_options(self, method, options, ctx=None):
        return dict(options)


class Tampering(NativeEngine):
    """Loads like the native engine, then nudges one weight: nothing the kernel's checks can see."""

    name, preference = "conformance-tampering", 999

    def load(self, plan, ctx):
        import torch

        model = super().load(plan, ctx)
        with torch.no_grad():
            next(model.parameters()).view(-1)[0] += 1
        return model


class SplitsTiedWeights(PlacementStrategy):
    name = "conformance-split-tied"

    def place(self, ctx):
        tied = {name.rpartition(".")[0] for group in ctx.tied_groups() for name in group}
        return {"": "cpu", **{module: "disk" for module in sorted(tied)[:1]}}


class PromisesTheCpu(PlacementStrategy):
    """Says the whole model goes to the CPU (so an engine may read ahead into host memory), then
    sends the output head to disk."""

    name = "conformance-promises-cpu"

    def whole_model_device(self, spec):
        return "cpu"

    def place(self, ctx):
        return {"": "cpu", "lm_head": "disk"}


class ClaimsEverything(Resolver):
    """Answers every reference with the current folder, and crashes on its own broken ones."""

    name, priority = "conformance-greedy", 50

    def resolve(self, reference, ctx):
        from pathlib import Path

        if reference.startswith("greedy://broken"):
            raise ValueError("cannot parse")  # an untyped error for its own broken reference
        return ResolvedSource(reference, Path.cwd(), "greedy")


class Plugin:
    @loadstone.hookimpl
    def loadstone_register_quantization_backends(self, register):
        for backend in (HalfLinear(), Underestimates(), ForgetsWhatIsInFlight(), TakesAnyOption()):
            register(backend)

    @loadstone.hookimpl
    def loadstone_register_engines(self, register):
        register(Tampering())

    @loadstone.hookimpl
    def loadstone_register_placement_strategies(self, register):
        register(SplitsTiedWeights())
        register(PromisesTheCpu())


class GreedyPlugin:
    @loadstone.hookimpl
    def loadstone_register_resolvers(self, register):
        register(ClaimsEverything())


@pytest.fixture(scope="module")
def manager():
    return loadstone.PluginManager(allow=[], disable=[], extra_plugins=[("conformance-defects", Plugin())])


def failed(report, check):
    result = report[check]
    assert result.status == "failed", report.render()
    return "\n".join(result.problems)


def test_a_sound_converting_backend_passes(loadstone_conformance, manager):
    report = loadstone_conformance.backend("half-linear", plugins=manager, only=["estimate", "peak", "refusals"])
    assert report.ok, report.render()
    assert report["peak"].measured["cases"][0]["planned_in_flight"] > 0


def test_an_underestimated_size_fails_the_estimate(loadstone_conformance, manager):
    report = loadstone_conformance.backend("under", plugins=manager, only=["estimate"])
    problems = failed(report, "estimate")
    assert "llama float32 trainable=False: the plan estimates" in problems and "tolerance 5%" in problems
    with pytest.raises(conformance.ConformanceFailure, match="FAILED  estimate"):
        report.assert_ok()


def test_a_forgotten_full_precision_tensor_fails_the_peak(loadstone_conformance, manager):
    problems = failed(loadstone_conformance.backend("no-transient", plugins=manager, only=["peak"]), "peak")
    assert "converting model.layers.0.mlp.down_proj.weight held 32768 B at once" in problems
    assert "the plan allows 0 B in flight" in problems


def test_an_option_taken_silently_fails_the_refusals(loadstone_conformance, manager):
    problems = failed(loadstone_conformance.backend("any-option", plugins=manager, only=["refusals"]), "refusals")
    assert "conformance_no_such_option" in problems and "planned without error, expected OptionError" in problems


def test_a_wrong_distribution_fails_the_attribution(loadstone_conformance, manager):
    report = loadstone_conformance.backend("half-linear", plugins=manager, distribution="loadstone-half",
                                           only=["attribution"])
    assert "registered by '<in-process>', expected 'loadstone-half'" in failed(report, "attribution")


def test_an_in_process_plugin_cannot_be_listed_and_says_so(loadstone_conformance, manager):
    result = loadstone_conformance.backend("half-linear", plugins=manager, only=["listing"])["listing"]
    assert result.status == "skipped" and "registered in-process" in result.reason


def test_a_heavy_import_while_listing_fails(loadstone_conformance, fixture_dist):
    # The test plugin's own package stands in for a heavy library: the check must see it imported.
    site = str(fixture_dist("loadstone-testplugin"))
    sys.path.insert(0, site)
    try:
        manager = loadstone.PluginManager(allow=["loadstone-testplugin"], disable=[])
        report = loadstone_conformance.placement("testplace", plugins=manager, heavy_modules=["loadstone_testplugin"],
                                                 only=["listing"])
        assert "listing plugins imported loadstone_testplugin" in failed(report, "listing")
        clean = loadstone_conformance.placement("testplace", plugins=manager, only=["listing"])
        assert clean["listing"].passed, clean.render()
        assert clean["listing"].measured["listed"]["name"] == "testplace"
    finally:
        sys.path.remove(site)


def test_a_tampering_engine_fails_equality_with_transformers(loadstone_conformance, manager):
    report = loadstone_conformance.engine("conformance-tampering", plugins=manager, architectures=["llama"],
                                          dtypes=["float32"], only=["equal_to_reference", "invariants"])
    assert "model.embed_tokens.weight: values differ" in failed(report, "equal_to_reference")
    assert report["invariants"].passed  # the kernel's invariants cannot see a changed value: only the kit can


def test_split_tied_weights_fail_the_placement(loadstone_conformance, manager):
    report = loadstone_conformance.placement("conformance-split-tied", plugins=manager, architectures=["gpt2"],
                                             offload=True, only=["tied_together", "every_tensor_placed"])
    assert "but its tied twin" in failed(report, "tied_together")
    assert report["every_tensor_placed"].passed


def test_a_strategy_that_breaks_its_whole_model_device_promise_fails(loadstone_conformance, manager):
    report = loadstone_conformance.placement("conformance-promises-cpu", plugins=manager, architectures=["llama"],
                                             offload=True, only=["whole_model_device"])
    assert "whole_model_device('conformance-promises-cpu') said cpu, but place() returned" in failed(
        report, "whole_model_device")


def test_a_greedy_resolver_fails_foreign_and_broken_references(loadstone_conformance):
    greedy = loadstone.PluginManager(allow=[], disable=[], extra_plugins=[("conformance-greedy", GreedyPlugin())])
    report = loadstone_conformance.resolver("conformance-greedy", plugins=greedy, broken=["greedy://broken"],
                                            only=["foreign_references", "broken_references"])
    assert "'org/model' (weights=True) was claimed" in failed(report, "foreign_references")
    problems = failed(report, "broken_references")
    assert "'greedy://broken' raised ValueError, not a LoadstoneError" in problems
    assert "through loadstone.plan it became a PluginHookError" in problems


@pytest.mark.parametrize("checkpointing", [False, True])
def test_recomputation_is_seen_only_with_checkpointing(tiny_adapter, manager, checkpointing):
    loaded = loadstone.load(str(tiny_adapter("llama")), placement="cpu", progress=False, plugins=manager,
                            gradient_checkpointing=checkpointing)
    step = conformance.train_one_step(loaded.model)
    assert (step.recomputed > 0) is checkpointing and step.forward_calls > 0
    assert step.with_grad == step.trainable == step.changed and not step.frozen_changed
