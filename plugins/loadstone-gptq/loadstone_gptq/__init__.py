"""loadstone-gptq: GPTQ checkpoints as a loadstone plugin, on gptqmodel.

``import loadstone_gptq`` imports neither torch nor gptqmodel. Users never need to import it to
load: loadstone finds it through its entry point. It exports the backend class, the quantize API
(:func:`quantize`) and the memory helpers for people who build on them.
"""

from .backend import GPTQBackend
from .layers import layer_bytes, measured_bytes
from .quantize import quantize
from .settings import OPTION_HELP, GPTQSettings

__version__ = "0.1.0"
__all__ = ["GPTQBackend", "GPTQSettings", "OPTION_HELP", "layer_bytes", "measured_bytes", "quantize", "__version__"]
