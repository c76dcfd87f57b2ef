"""Fixtures shared by the plugin's tests. ``tiny_checkpoint`` and ``tiny_adapter`` come from
loadstone's pytest plugin; ``plan_of`` builds plans through the real plugin manager (this
distribution found by its entry points)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest

import loadstone


@pytest.fixture(scope="session", autouse=True)
def quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


@pytest.fixture
def plugins(monkeypatch: pytest.MonkeyPatch) -> loadstone.PluginManager:
    """Every installed plugin, whatever the caller's environment allows or disables."""
    monkeypatch.delenv("LOADSTONE_PLUGINS", raising=False)
    monkeypatch.delenv("LOADSTONE_DISABLE_PLUGINS", raising=False)
    return loadstone.PluginManager()


@pytest.fixture
def write_map(tmp_path: Path) -> Callable[..., Path]:
    """``write_map(text, suffix=".yaml")``: a device-map file in a fresh folder."""
    count = iter(range(1000))

    def write(text: str, suffix: str = ".yaml") -> Path:
        path = tmp_path / f"map{next(count)}{suffix}"
        path.write_text(text, encoding="utf-8")
        return path

    return write
