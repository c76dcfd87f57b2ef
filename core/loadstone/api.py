"""The public entry points: :func:`plan` and :func:`load`.

A thin face over :mod:`loadstone.pipeline`, which runs the stages (``loadstone.STAGES``):
resolve -> inspect -> plan -> load_weights -> prepare -> adapters -> report, each timed in the
report. ``plan`` runs the first three only and reads no weight data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import pipeline
from .contract.plan import Plan
from .contract.report import LoadReport
from .contract.request import LoadRequest
from .plugins import PluginManager, get_plugin_manager
from .stages.report import count_parameters  # noqa: F401  (public: loadstone.count_parameters)


@dataclass
class LoadResult:
    """What :func:`load` returns."""

    model: Any
    report: LoadReport
    plan: Plan

    def __iter__(self):  # allows ``model, report = loadstone.load(...)``
        return iter((self.model, self.report))


def _request(reference: Any, kwargs: dict[str, Any]) -> LoadRequest:
    if isinstance(reference, LoadRequest):
        if kwargs:
            raise TypeError("pass either a LoadRequest or keyword arguments, not both")
        return reference
    return LoadRequest(reference, **kwargs)


def plan(reference: Any, *, plugins: PluginManager | None = None, **kwargs: Any) -> Plan:
    """Compute what :func:`load` would do, reading configs and headers only.

    Takes the same arguments as :func:`load`. The plan's ``device_map`` is exactly the one a
    load with the same arguments uses; ``plan.fits`` and ``plan.advice`` say whether it fits.

    >>> p = loadstone.plan("./my-model", quantization="nf4", placement="auto",
    ...                    max_memory={"cuda:0": "20GiB"})          # doctest: +SKIP
    >>> p.bytes_per_device                                          # doctest: +SKIP
    {'cuda:0': 5702112256}
    """
    return pipeline.plan(_request(reference, kwargs), plugins or get_plugin_manager())


def load(reference: Any, *, plugins: PluginManager | None = None, weight_loader: Any = None,
         **kwargs: Any) -> LoadResult:
    """Load a base model (and its adapters) for parameter-efficient fine-tuning.

    :param reference: a local model folder, a Hub id ``org/name[@revision]``, an adapter folder
        (its base is found from ``adapter_config.json``), or anything a resolver plugin handles.
    :param quantization: ``None`` (the checkpoint's own, else none), ``"none"``, or a method a
        backend provides (``"nf4"``, ``"int8"`` ...), or ``{"method": ..., **options}``.
    :param quantization_options: backend options (see ``loadstone plugins``).
    :param placement: ``"auto"``, ``"balanced"``, ``"sequential"``, ``"cpu"``, a device such as
        ``"cuda:1"``, ``"rank"``, a strategy from a plugin, or an explicit ``{module: device}`` map.
    :param dtype: ``"auto"`` (the checkpoint's own), ``"bfloat16"``, ``"float16"``, ``"float32"``.
    :param trainable: freeze the base and make the active adapter trainable (``False``: all frozen).
    :param adapters: extra adapters, a list of references (``"name=path"`` allowed) or a dict.
    :param base: base model reference overriding the adapter's ``base_model_name_or_path``.
    :param task: ``"causal-lm"`` (default), ``"sequence-classification"`` ...
    :param max_memory: budget per device, e.g. ``{"cuda:0": "20GiB", "cpu": "64GiB"}``.
    :param offload_folder: folder for disk offload; the load writes into a folder of its own inside it
        and removes that if it fails (outside the checkpoint and adapter folders).
    :param engine: ``"auto"`` (default: the native engine where it can run the plan, else
        transformers), ``"loadstone"``, ``"transformers"``, or an engine from a plugin.
    :param plugins: a :class:`PluginManager` (default: discovered from the environment).
    :param weight_loader: deprecated since 0.2 (contract 1's seam): an object with ``name`` and
        ``load(plan)``, run as the engine of this one load. Register an :class:`Engine` instead.
    :return: :class:`LoadResult` with ``model``, ``report`` and ``plan``.

    Further keywords: ``active_adapter``, ``revision``, ``cache_dir``, ``offline``, ``token``,
    ``trust_remote_code``, ``allow_pickle``, ``attn_implementation``,
    ``gradient_checkpointing``, ``progress``.
    """
    plugins = plugins or get_plugin_manager()
    request = _request(reference, kwargs)
    engine = None
    if weight_loader is not None:
        from .legacy import loader_engine

        engine = loader_engine(weight_loader)

    def finish(model: Any, report: LoadReport, the_plan: Plan) -> LoadResult:
        result = LoadResult(model, report, the_plan)
        plugins.call("loadstone_after_load", "report", result=result)
        return result

    return pipeline.load(request, plugins, engine=engine, finish=finish)
