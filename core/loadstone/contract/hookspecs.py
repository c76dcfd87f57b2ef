"""The hook contract third-party plugins implement.

A plugin is any module or object registered in the ``loadstone`` entry-point group that
implements some of these hooks, decorated with :data:`loadstone.hookimpl`. Hooks come in two
groups:

* **registration hooks** (called once, when plugins are discovered) hand the plugin a
  ``register`` callback to add components: quantization backends, placement strategies,
  source resolvers and weight-loading engines. The kernel records which plugin and distribution registered each one.
* **lifecycle hooks** (called on every load) let integrations observe or patch a load, e.g. for
  audit logging.

Hook arguments may grow in later versions: pluggy passes only the arguments an implementation
names, so implementations keep working when new ones are added. The kernel calls each
implementation itself (newest-registered first; ``tryfirst``/``trylast`` honoured) so that a
failure names its plugin; hook wrappers (``wrapper=True``, ``hookwrapper=True``) are refused.
docs/hooks.md documents every hook with an example.
"""

from __future__ import annotations

import pluggy

PROJECT = "loadstone"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# ----------------------------------------------------------------- registration (at discovery)


@hookspec
def loadstone_register_quantization_backends(register):
    """Register quantization backends.

    :param register: callable taking one :class:`loadstone.QuantizationBackend` instance. Each
        of the backend's ``methods`` becomes a value users can pass as ``quantization=``; each
        of its ``checkpoint_formats`` a pre-quantized ``quant_method`` it claims.
    :return: ignored.

    Two plugins registering the same method or backend name is an error naming both
    distributions. Do not import heavy libraries here; do it inside the backend's methods.
    """


@hookspec
def loadstone_register_placement_strategies(register):
    """Register placement strategies.

    :param register: callable taking one :class:`loadstone.PlacementStrategy` instance. Its
        ``name`` (or anything its ``matches`` accepts) becomes a value of ``placement=``.
    :return: ignored.

    Names must be unique across plugins.
    """


@hookspec
def loadstone_register_resolvers(register):
    """Register source resolvers.

    :param register: callable taking one :class:`loadstone.Resolver` instance. Resolvers are
        asked in ascending ``priority`` (ties by name) and the first non-``None`` answer wins.
    :return: ignored.
    """


@hookspec
def loadstone_register_engines(register):
    """Register weight-loading engines.

    :param register: callable taking one :class:`loadstone.Engine` instance. Its ``name`` becomes
        a value of ``engine=`` (CLI ``--engine``); ``engine="auto"`` tries engines in ascending
        ``preference`` and takes the first whose ``problems(plan)`` is empty.
    :return: ignored.

    Names must be unique across plugins.
    """


# ----------------------------------------------------------------- lifecycle (on every load)


@hookspec
def loadstone_before_load(request):
    """Called before anything is resolved or read.

    :param request: the :class:`loadstone.LoadRequest` about to run. Implementations may change
        its fields (e.g. force ``trust_remote_code=False`` or pin a ``revision``); the kernel
        validates it again afterwards.
    :return: ignored.

    Raising aborts the load with a :class:`loadstone.PluginHookError` naming your plugin.
    """


@hookspec
def loadstone_after_plan(plan, request):
    """Called once the plan is complete, before any weight is read.

    :param plan: the :class:`loadstone.Plan` (device map, bytes per device, decisions).
    :param request: the :class:`loadstone.LoadRequest`.
    :return: ignored.

    Useful to veto a load (raise a :class:`loadstone.LoadstoneError`) or to log what will happen.
    ``loadstone plan`` calls this hook too.
    """


@hookspec
def loadstone_model_loaded(model, plan, request):
    """Called right after the base model's weights are loaded, before it is frozen, prepared
    for training or given adapters.

    :param model: the ``transformers.PreTrainedModel`` just built.
    :param plan: the :class:`loadstone.Plan` it was loaded with.
    :param request: the :class:`loadstone.LoadRequest`.
    :return: ignored.

    The place to patch the base model (e.g. swap attention modules) before adapters wrap it.
    """


@hookspec
def loadstone_after_load(result):
    """Called when a load has finished and its report is complete.

    :param result: the :class:`loadstone.LoadResult` (``.model``, ``.report``, ``.plan``).
    :return: ignored.

    The place for audit logging: ``result.report.to_dict()`` is JSON-serialisable. Raising here
    fails the finished load (and ``loadstone_load_failed`` runs).
    """


@hookspec
def loadstone_load_failed(request, stage, error):
    """Called when a load (or a plan) fails, before the error reaches the caller.

    :param request: the :class:`loadstone.LoadRequest`.
    :param stage: name of the stage that failed, one of :data:`loadstone.STAGES`
        (``"before_load"``, ``"resolve"``, ``"inspect"``, ``"plan"``, ``"load_weights"``,
        ``"prepare"``, ``"adapters"``, ``"report"``).
    :param error: the exception that will be raised (any exception, ``KeyboardInterrupt`` included).
    :return: ignored. Exceptions raised here are logged and otherwise ignored, so that the
        original error is what the caller sees.
    """
