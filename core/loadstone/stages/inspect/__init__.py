"""Stage 2, inspect: read and validate what the sources hold, without reading weight data.

The weight files' headers (``checkpoint``: index, shards, dtypes, shapes, byte ranges), the model
configuration (``config``: ``config.json`` through transformers, remote code refused unless
allowed) and the adapters' weight headers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...contract.checkpoint import CheckpointInventory
from ...contract.report import Decision, LoadReport
from ...contract.request import LoadRequest
from ...contract.sources import Sources
from ...safetensors_header import read_safetensors_header
from .checkpoint import inspect_checkpoint, read_index
from .config import CONFIG, import_transformers, load_config, read_raw_config

__all__ = ["Inspection", "inspect", "inspect_weights", "inspect_checkpoint", "read_index", "load_config",
           "read_raw_config", "import_transformers", "CONFIG"]


@dataclass
class Inspection:
    """What the inspect stage found: the base checkpoint's inventory and its configuration."""

    inventory: CheckpointInventory
    config: Any


def inspect_weights(request: LoadRequest, sources: Sources) -> CheckpointInventory:
    """The base checkpoint's weight headers, read and validated: the cheapest check, needing
    neither torch nor transformers, and all an engine needs to start reading ahead."""
    return inspect_checkpoint(sources.base.path, allow_pickle=request.allow_pickle,
                              remote_headers=sources.base.remote_headers)


def inspect(request: LoadRequest, sources: Sources, report: LoadReport, inventory: CheckpointInventory) -> Inspection:
    """The rest of the stage once :func:`inspect_weights` has read the weight headers
    (``inventory``): the configuration, and the adapters' weight headers."""
    config = load_config(sources.base.path, request, inventory)
    for adapter in sources.adapters:
        if adapter.weights.suffix == ".safetensors":
            read_safetensors_header(adapter.weights)
    report.checkpoint = inventory.to_dict()
    if request.trust_remote_code:
        report.decide(Decision("remote code", "trusted", "user", "trust_remote_code=True"))
        report.notes.append("trust_remote_code is ON: code shipped with the checkpoint may run")
    return Inspection(inventory, config)
