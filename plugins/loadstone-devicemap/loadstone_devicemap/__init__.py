"""loadstone-devicemap: device maps beyond the kernel's built-ins.

* ``placement="file:map.yaml"``: a YAML or JSON file of rules (exact names, globs such as
  ``model.layers.[0-15].*``, ``re:`` regular expressions), checked against the model;
* ``placement="even"`` / ``"layers:N"``: decoder layers split evenly by bytes over the GPUs;
* disk offload with the free space checked before anything is written;
* ``placement="fsdp"``: each torchrun process holds its FSDP2 shard of the model, streamed from
  the checkpoint without a full copy anywhere (:mod:`loadstone_devicemap.fsdp`).

Everything is built on loadstone's public API; the kernel never imports this package.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .fsdp import FsdpEngine, FsdpPlacement, shard_model  # noqa: E402
from .mapfile import read_rules  # noqa: E402
from .offload import free_bytes, set_free_space_probe  # noqa: E402
from .rules import Rule, parse_rule  # noqa: E402
from .split import Block, Device, Split, split_layers  # noqa: E402

__all__ = ["__version__", "FsdpEngine", "FsdpPlacement", "shard_model", "read_rules", "Rule", "parse_rule", "Block", "Device", "Split", "split_layers",
           "free_bytes", "set_free_space_probe"]
