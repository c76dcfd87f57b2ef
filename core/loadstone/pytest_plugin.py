"""pytest fixtures for testing loadstone plugins (registered through the ``pytest11`` entry point).

Any project with loadstone installed gets these fixtures:

``tiny_checkpoint(arch, **kw)``
    Path to a random checkpoint of a real architecture (see :data:`loadstone.testing.ARCHITECTURES`),
    built once per session for each distinct set of arguments.
``tiny_adapter(arch, **kw)``
    Path to a LoRA adapter folder for ``tiny_checkpoint(arch)``.
``plugin_manager(**kw)``
    A fresh :class:`loadstone.PluginManager` (not the process-wide one), e.g.
    ``plugin_manager(disable=["hub"], extra_plugins=[("mine", MyPlugin())])``.
``loadstone_conformance``
    The conformance kit with one work folder per session
    (:class:`loadstone.testing.conformance.ConformanceSession`):
    ``loadstone_conformance.backend("my-method", only=[check]).assert_ok()``; likewise
    ``.engine(name)``, ``.placement(spec)``, ``.resolver(name, own=[...])``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import pytest


def _key(kwargs: dict[str, Any]) -> str:
    return json.dumps(kwargs, sort_keys=True, default=str)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    from .testing import make_checkpoint

    cache: dict[str, Path] = {}

    def build(arch: str = "llama", **kwargs: Any) -> Path:
        key = _key({"arch": arch, **kwargs})
        if key not in cache:
            cache[key] = make_checkpoint(arch, tmp_path_factory.mktemp(f"ckpt-{arch}"), **kwargs)
        return cache[key]

    return build


@pytest.fixture(scope="session")
def tiny_adapter(tiny_checkpoint: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    from .testing import make_lora_adapter

    cache: dict[str, Path] = {}

    def build(arch: str = "llama", *, checkpoint_kwargs: dict[str, Any] | None = None, **kwargs: Any) -> Path:
        key = _key({"arch": arch, "ck": checkpoint_kwargs or {}, **kwargs})
        if key not in cache:
            base = tiny_checkpoint(arch, **(checkpoint_kwargs or {}))
            cache[key] = make_lora_adapter(base, tmp_path_factory.mktemp(f"lora-{arch}"), arch=arch, **kwargs)
        return cache[key]

    return build


@pytest.fixture
def plugin_manager() -> Callable[..., Any]:
    from .plugins import PluginManager

    def build(**kwargs: Any) -> PluginManager:
        return PluginManager(**kwargs)

    return build


@pytest.fixture(scope="session")
def loadstone_conformance(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from .testing.conformance import ConformanceSession

    return ConformanceSession(tmp_path_factory.mktemp("conformance"))
