"""A component method that crashes is reported with its plugin, distribution and stage;
a deliberate LoadstoneError from a component reaches the caller unchanged."""

import pytest

import loadstone


class Flaky(loadstone.QuantizationBackend):
    """A working no-op backend that crashes in exactly one method, named at construction."""

    name = "flaky"
    methods = ("flaky",)

    def __init__(self, crash_in: str, error: Exception | None = None):
        self.crash_in = crash_in
        self.error = error or RuntimeError(f"boom in {crash_in}")

    def _maybe_crash(self, method: str) -> None:
        if method == self.crash_in:
            raise self.error

    def environment_problems(self):
        self._maybe_crash("environment_problems")
        return []

    def normalize_options(self, method, options):
        self._maybe_crash("normalize_options")
        return dict(options)

    def adjust_dtype(self, dtype, ctx):
        self._maybe_crash("adjust_dtype")
        return dtype

    def parameter_bytes(self, module_name, param_name, tensor, module, ctx):
        self._maybe_crash("parameter_bytes")
        return tensor.numel() * tensor.element_size()

    def check_placement(self, device_map, ctx):
        self._maybe_crash("check_placement")
        return device_map

    def describe(self, ctx):
        self._maybe_crash("describe")
        return super().describe(ctx)

    def transformers_config(self, ctx):
        self._maybe_crash("transformers_config")
        return None

    def prepare_for_training(self, model, ctx):
        self._maybe_crash("prepare_for_training")
        return []


class Plugin:
    def __init__(self, backend):
        self.backend = backend

    @loadstone.hookimpl
    def loadstone_register_quantization_backends(self, register):
        register(self.backend)


PLAN_METHODS = ["environment_problems", "normalize_options", "adjust_dtype", "parameter_bytes",
                "check_placement", "describe", "transformers_config"]


@pytest.mark.parametrize("method", PLAN_METHODS + ["prepare_for_training"])
def test_crash_names_plugin_distribution_and_stage(tiny_checkpoint, plugin_manager, method):
    manager = plugin_manager(allow=[], extra_plugins=[("flaky-plugin", Plugin(Flaky(method)))])
    with pytest.raises(loadstone.PluginHookError) as info:
        loadstone.load(str(tiny_checkpoint("llama")), quantization="flaky", placement="cpu", progress=False,
                       plugins=manager)
    error = info.value
    assert error.plugin == "flaky-plugin"
    assert error.distribution == "<in-process>"
    assert error.stage == ("prepare" if method == "prepare_for_training" else "plan")
    assert method in str(error) and "boom" in str(error)
    assert isinstance(error.__cause__, RuntimeError)


def test_deliberate_error_passes_through_unchanged(tiny_checkpoint, plugin_manager):
    refusal = loadstone.OptionError("flaky does not take that option.", field="quantization options", fix="drop it")
    manager = plugin_manager(allow=[], extra_plugins=[("flaky-plugin", Plugin(Flaky("normalize_options", refusal)))])
    with pytest.raises(loadstone.OptionError) as info:
        loadstone.plan(str(tiny_checkpoint("llama")), quantization="flaky", plugins=manager)
    assert info.value is refusal


def test_listing_survives_a_crashing_backend(plugin_manager):
    manager = plugin_manager(allow=[], extra_plugins=[("flaky-plugin", Plugin(Flaky("environment_problems")))])
    listed = {item["name"]: item for item in manager.describe()}
    (component,) = listed["flaky-plugin"]["components"]
    assert component["available"] is False
    assert "RuntimeError: boom in environment_problems" in component["problems"][0]


def test_gradient_checkpointing_needs_a_trainable_load(tiny_checkpoint):
    with pytest.raises(loadstone.OptionError, match="trainable=False"):
        loadstone.plan(str(tiny_checkpoint("llama")), gradient_checkpointing=True, trainable=False)


def test_a_resolver_returning_something_else_is_named(tiny_checkpoint):
    """A resolver that returns a plain path instead of a ResolvedSource: the plugin is named."""

    class PathResolver(loadstone.Resolver):
        name = "returns-a-path"
        priority = 1

        def resolve(self, reference, ctx):
            return str(tiny_checkpoint("llama"))

    class Plugin:
        @loadstone.hookimpl
        def loadstone_register_resolvers(self, register):
            register(PathResolver())

    plugins = loadstone.PluginManager(allow=[], extra_plugins=[("path-resolver", Plugin())])
    with pytest.raises(loadstone.PluginHookError) as info:
        loadstone.plan("anything", plugins=plugins)
    assert info.value.plugin == "path-resolver" and "not a ResolvedSource" in str(info.value)
