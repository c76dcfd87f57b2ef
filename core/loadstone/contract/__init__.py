"""The contract third-party plugins build on, and the value types the pipeline passes along.

Everything here sits below the pipeline's stages and imports none of them: hook specifications
(:mod:`.hookspecs`), the four component types (quantization backends, placement strategies,
source resolvers, engines), the contexts and value objects they exchange with the kernel, and
the typed errors. Importing it is cheap: no torch, no transformers.

:data:`VERSION` is the contract's version. Within a major version, hooks and component methods
only gain optional arguments and new methods with defaults; a change that would break a plugin
keeps the old form working with a ``DeprecationWarning`` for at least one minor release of
loadstone before it is removed (docs/hooks.md, "Contract version and deprecation policy").
"""

from __future__ import annotations

#: Contract 2: engines are components; backends may convert weights themselves. 2.1 added
#: ``Engine.read_ahead`` and ``PlacementStrategy.whole_model_device`` (both optional).
VERSION = "2.1"

#: The pipeline's stages in the order they run (``loadstone_load_failed`` names one of them).
STAGES = ("before_load", "resolve", "inspect", "plan", "load_weights", "prepare", "adapters", "report")
