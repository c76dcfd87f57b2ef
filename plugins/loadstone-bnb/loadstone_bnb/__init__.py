"""loadstone-bnb: bitsandbytes NF4 / FP4 / int8 quantization as a loadstone plugin.

``import loadstone_bnb`` imports neither torch nor bitsandbytes. Users never need to import it:
loadstone finds it through its entry point. It exports the backend class and the memory helpers
for people who build on them (benchmarks, other backends).
"""

from .backend import BitsAndBytesBackend
from .memory import bits_per_parameter, measured_bytes
from .options import OPTION_HELP, BnbSettings

__version__ = "0.2.0"
__all__ = ["BitsAndBytesBackend", "BnbSettings", "OPTION_HELP", "bits_per_parameter", "measured_bytes", "__version__"]
