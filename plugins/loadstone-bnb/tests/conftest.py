"""Fixtures shared by the plugin's tests.

``tiny_checkpoint``, ``tiny_adapter`` and ``plugin_manager`` come from loadstone's pytest plugin
(``loadstone.pytest_plugin``), which every project with loadstone installed gets. Loads are
cached per session: a quantized tiny model is built once and read by several tests, which keeps
the whole suite to seconds. Tests that change a model (training) load their own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest

import loadstone


@pytest.fixture(scope="session", autouse=True)
def quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


@pytest.fixture(scope="session")
def input_ids() -> Any:
    import torch

    return torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="session")
def quantized(tiny_checkpoint: Callable[..., Path]) -> Callable[..., loadstone.LoadResult]:
    """``quantized(arch, method, **load_kwargs)``: a cached CPU load for inference."""
    cache: dict[tuple, loadstone.LoadResult] = {}

    def build(arch: str, method: str, **kwargs: Any) -> loadstone.LoadResult:
        key = (arch, method, repr(sorted(kwargs.items())))
        if key not in cache:
            kwargs.setdefault("trainable", False)
            cache[key] = loadstone.load(str(tiny_checkpoint(arch)), quantization=method, placement="cpu",
                                        progress=False, **kwargs)
        return cache[key]

    return build


@pytest.fixture(scope="session")
def reference_logits(tiny_checkpoint: Callable[..., Path], input_ids: Any) -> Callable[[str], Any]:
    """Logits of the unquantized model, loaded through the same kernel (``quantization="none"``)."""
    import torch

    cache: dict[str, Any] = {}

    def build(arch: str) -> Any:
        if arch not in cache:
            model = loadstone.load(str(tiny_checkpoint(arch)), quantization="none", placement="cpu",
                                   trainable=False, progress=False).model
            with torch.no_grad():
                cache[arch] = model(input_ids).logits
        return cache[arch]

    return build
