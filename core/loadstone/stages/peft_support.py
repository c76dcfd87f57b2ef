"""Working around what peft does on import-time detection of optional libraries."""

from __future__ import annotations

import contextlib
from typing import Iterator


# peft modules that ask whether gptqmodel is installed before importing it
_PEFT_GPTQMODEL_CHECKS = ("peft.tuners.lora.gptq", "peft.tuners.lora.awq", "peft.utils.quantization_utils",
                          "peft.utils.other")


@contextlib.contextmanager
def without_unused_gptqmodel() -> Iterator[None]:
    """peft imports gptqmodel, when it is installed, for every layer it wraps (to ask whether the
    layer is one of gptqmodel's); that import costs seconds, prints a banner and sets process-wide
    environment (PYTORCH_ALLOC_CONF). A model with a gptqmodel layer has imported gptqmodel already;
    for any other, peft is told gptqmodel is absent while it attaches the adapter."""
    import importlib
    import importlib.util
    import sys

    if "gptqmodel" in sys.modules or importlib.util.find_spec("gptqmodel") is None:
        yield
        return
    patched = []
    for name in _PEFT_GPTQMODEL_CHECKS:
        module = sys.modules.get(name) or importlib.import_module(name)
        if hasattr(module, "is_gptqmodel_available"):
            patched.append((module, module.is_gptqmodel_available))
            module.is_gptqmodel_available = _absent
    try:
        yield
    finally:
        for module, original in patched:
            module.is_gptqmodel_available = original


def _absent() -> bool:
    return False
