"""Built-in engines: ``loadstone`` (native) and ``transformers`` (``from_pretrained``)."""

from __future__ import annotations

from ..contract.hookspecs import hookimpl
from ..engines.native import NativeEngine
from ..engines.transformers import TransformersEngine


@hookimpl
def loadstone_register_engines(register):
    register(NativeEngine())
    register(TransformersEngine())
