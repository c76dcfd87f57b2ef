"""What the command line lets libraries print.

loadstone explains its own decisions in the report; the libraries it drives (transformers,
accelerate, peft, bitsandbytes, torch ...) print warnings and log lines meant for people calling
them directly: "Device 0 is not available" while planning for a GPU this machine lacks, "Some
parameters are on the meta device" for an offload loadstone planned, a kernel package
bitsandbytes would like installed. :func:`library_output` keeps them off stderr by default and
shows them, with loadstone's own debug lines, under ``--verbose``. loadstone's own warnings
(a plugin that was skipped) are always shown.

Both forms restore the process's warning filters, logger levels and environment when the block
ends, so calling ``loadstone.cli.main`` in-process leaves the caller's logging as it was.
"""

from __future__ import annotations

import logging
import os
import warnings
from contextlib import contextmanager
from typing import Iterator

from .contract.records import PluginLoadWarning

#: Warning categories loadstone defines; shown even when libraries are silenced.
LOADSTONE_WARNINGS: tuple[type[Warning], ...] = (PluginLoadWarning,)

#: Loggers of libraries that set their own level (so the root logger's level does not reach them),
#: silenced by name; every other library logger inherits the root logger's level.
LIBRARY_LOGGERS = ("transformers", "accelerate", "peft", "bitsandbytes", "torch", "huggingface_hub",
                   "safetensors", "gptqmodel", "optimum", "torchao", "urllib3", "filelock", "httpx")


def _library_loggers() -> list[str]:
    """The library loggers above, and their children that carry a level of their own (torch's logging
    setup gives e.g. ``torch.utils._pytree`` one), which their parent's level would not reach."""
    names = list(LIBRARY_LOGGERS)
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if (isinstance(logger, logging.Logger) and logger.level != logging.NOTSET
                and name.split(".")[0] in LIBRARY_LOGGERS and name not in names):
            names.append(name)
    return names

# Read by transformers and huggingface_hub when they first configure their loggers (maybe later
# in the block than this module runs).
_VERBOSITY_ENV = ("TRANSFORMERS_VERBOSITY", "HF_HUB_VERBOSITY", "TORCH_LOGS")
# torch sets its own loggers' levels when it is imported (from TORCH_LOGS), which would undo a level
# set before a lazy `import torch` inside the block.
_QUIET_VALUES = {"TORCH_LOGS": "-all"}
_DEBUG_FORMAT = "%(name)s: %(levelname)s: %(message)s"


@contextmanager
def library_output(*, verbose: bool) -> Iterator[None]:
    """Silence library warnings and log lines below ERROR (``verbose=False``), or show them as the
    libraries emit them plus loadstone's debug lines (``verbose=True``)."""
    libraries = _library_loggers()
    levels = {name: logging.getLogger(name).level for name in ("", "loadstone", *libraries)}
    env = {name: os.environ.get(name) for name in _VERBOSITY_ENV}
    handler: logging.Handler | None = None
    try:
        with warnings.catch_warnings():
            if verbose:
                warnings.simplefilter("default")  # each distinct warning once per place it comes from
                handler = logging.StreamHandler()
                handler.setFormatter(logging.Formatter(_DEBUG_FORMAT))
                loadstone_log = logging.getLogger("loadstone")
                loadstone_log.addHandler(handler)
                loadstone_log.setLevel(logging.DEBUG)
            else:
                warnings.simplefilter("ignore")
                for category in LOADSTONE_WARNINGS:
                    warnings.filterwarnings("default", category=category)
                logging.getLogger().setLevel(logging.ERROR)
                for name in libraries:
                    logging.getLogger(name).setLevel(logging.ERROR)
                # loadstone's own warnings (a plugin hook that raised while a load failed) stay.
                logging.getLogger("loadstone").setLevel(logging.WARNING)
                for name in _VERBOSITY_ENV:
                    os.environ.setdefault(name, _QUIET_VALUES.get(name, "error"))  # a user's explicit choice wins
            yield
    finally:
        if handler is not None:
            logging.getLogger("loadstone").removeHandler(handler)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        for name, value in env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
