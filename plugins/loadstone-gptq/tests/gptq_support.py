"""Helpers the plugin's tests share (a module of its own: test files are not a package, and a
module named conftest would be ambiguous between test folders)."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch

CPU_SETTINGS = {"GPTQMODEL_DISABLE_PACK_EXT": "1", "TORCHDYNAMO_DISABLE": "1"}
CALIBRATION = [f"the quick brown fox number {i} jumps over the lazy dog while the cat sleeps" for i in range(24)]


@contextlib.contextmanager
def cpu_settings() -> Iterator[None]:
    """The gptqmodel settings every test runs with (see conftest.py), restored afterwards."""
    saved = {name: os.environ.get(name) for name in CPU_SETTINGS}
    os.environ.update(CPU_SETTINGS)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def layer_weight(module: torch.nn.Module) -> torch.Tensor:
    """The ``[out, in]`` weight a loaded layer applies, read through its own forward: the identity
    matrix in, the weight's rows out (minus the bias). Independent of how the kernel stores it."""
    eye = torch.eye(module.in_features, dtype=torch.float32)
    with torch.no_grad():
        out = module(eye)
    if getattr(module, "bias", None) is not None:
        out = out - module.bias.float()
    return out.T.float()
