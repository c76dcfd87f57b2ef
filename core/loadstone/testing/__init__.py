"""Helpers for testing loadstone and loadstone plugins (they ship with the kernel, like ``tox.pytest``).

* tiny real checkpoints and adapters (:mod:`.checkpoints`): ``make_checkpoint``,
  ``make_lora_adapter``, ``make_hub_cache``; ``python -m loadstone.testing`` runs them from a shell;
* ``plugins_with(method, module, name)``: the environment's plugins, with a plugin module
  registered in-process when no installed plugin provides a quantization method;
* the conformance kit (:mod:`loadstone.testing.conformance`): point it at a quantization backend,
  an engine, a placement strategy or a resolver and it runs the contract's checks on such
  checkpoints (``from loadstone.testing import conformance``).

>>> from loadstone.testing import make_checkpoint
>>> folder = make_checkpoint("llama", tmp_path / "llama")       # doctest: +SKIP
"""

from __future__ import annotations

from .checkpoints import (
    ARCHITECTURES,
    LORA_TARGETS,
    main,
    make_checkpoint,
    make_config,
    make_hub_cache,
    make_lora_adapter,
)
from .plugins import plugins_with

__all__ = ["ARCHITECTURES", "LORA_TARGETS", "main", "make_checkpoint", "make_config", "make_hub_cache",
           "make_lora_adapter", "plugins_with"]
