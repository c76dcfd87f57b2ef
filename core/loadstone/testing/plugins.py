"""A plugin manager that holds a quantization backend whether or not its plugin is installed."""

from __future__ import annotations

import importlib
from typing import Any


def plugins_with(method: str, module: str, name: str) -> Any:
    """The environment's plugins, holding the quantization backend for ``method``.

    Where an installed plugin provides ``method`` (its entry point is declared), that is the
    manager. Otherwise ``module`` (an importable plugin module, such as ``"loadstone_bnb.plugin"``)
    is registered in-process as plugin ``name``: as on a machine that runs a plugin from a source
    tree on ``PYTHONPATH`` without installing it (the lent GPU machine does). Raises
    ``ImportError`` when neither is available.
    """
    from ..contract.errors import ComponentNotFoundError
    from ..plugins import PluginManager

    manager = PluginManager()
    try:
        manager.quantization_backend(method)
        return manager
    except ComponentNotFoundError:
        return PluginManager(extra_plugins=[(name, importlib.import_module(module))])
