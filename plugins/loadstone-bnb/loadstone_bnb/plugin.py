"""The entry point (``[project.entry-points.loadstone] bnb = "loadstone_bnb.plugin"``).

loadstone imports this module when it discovers plugins, so it must stay cheap: it registers the
backend object, whose heavy imports (torch, bitsandbytes) happen only when a load uses it.
"""

from __future__ import annotations

import loadstone

from .backend import BitsAndBytesBackend


@loadstone.hookimpl
def loadstone_register_quantization_backends(register):
    register(BitsAndBytesBackend())
