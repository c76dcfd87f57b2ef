"""The entry point (``[project.entry-points.loadstone] gptq = "loadstone_gptq.plugin"``).

loadstone imports this module when it discovers plugins, so it must stay cheap: it registers the
backend object, whose heavy imports (torch, gptqmodel) happen only when a load uses it. It also
checks, once a plan is complete and before any weight is read, that a GPTQ checkpoint holds every
quantized layer's packed tensors in the shapes its config implies.
"""

from __future__ import annotations

import loadstone

from .backend import GPTQBackend
from .checks import check_plan
from .settings import config_file


@loadstone.hookimpl
def loadstone_register_quantization_backends(register):
    register(GPTQBackend())


@loadstone.hookimpl
def loadstone_after_plan(plan, request):
    backend = plan.quantization_backend.component
    if not isinstance(backend, GPTQBackend) or not plan.quantization.pre_quantized:
        return
    ctx = plan.quantization
    check_plan(plan, backend.settings(ctx), ctx.state.get("layers", {}), config_file(ctx))
