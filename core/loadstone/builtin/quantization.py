"""Built-in quantization backend ``none``: load the weights as they are stored."""

from __future__ import annotations

from ..contract.hookspecs import hookimpl
from ..contract.quantization import QuantizationBackend


class NoQuantization(QuantizationBackend):
    """Every default of the base class: tensors loaded as they are, in the load dtype."""

    name = "none"
    methods = ("none",)
    description = "no quantization: parameters in the chosen dtype"


@hookimpl
def loadstone_register_quantization_backends(register):
    register(NoQuantization())
