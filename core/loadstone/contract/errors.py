"""Typed errors raised by loadstone.

Every error a user can cause derives from :class:`LoadstoneError`. Besides its message it
carries structured fields (``file``, ``field``, ``expected``, ``found``, ``fix``) so that the
CLI can print one readable paragraph and programs can react without parsing text.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "LoadstoneError",
    "PluginError",
    "PluginLoadError",
    "PluginConflictError",
    "ComponentNotFoundError",
    "PluginHookError",
    "ResolutionError",
    "ConfigError",
    "CheckpointError",
    "UnsafeCheckpointError",
    "WeightsMismatchError",
    "AdapterError",
    "QuantizationError",
    "PlacementError",
    "EngineError",
    "OptionError",
]


class LoadstoneError(Exception):
    """Base class of every error loadstone raises on purpose.

    The structured fields are optional; ``str(error)`` renders the message followed by
    whichever fields are set, e.g.::

        model.safetensors: the header declares 812 bytes but the file holds 640.
        file: /ckpt/model.safetensors; field: header length; expected: <= 632 bytes; found: 812 bytes.
        Fix: re-download or re-save the checkpoint; the file is truncated.
    """

    exit_code = 2

    def __init__(
        self,
        message: str,
        *,
        file: Any = None,
        field: str | None = None,
        expected: Any = None,
        found: Any = None,
        fix: str | None = None,
    ) -> None:
        self.message = message
        self.file = str(file) if file is not None else None
        self.field = field
        self.expected = expected
        self.found = found
        self.fix = fix
        super().__init__(self._render())

    def _render(self) -> str:
        parts = [self.message.rstrip()]
        details = []
        if self.file is not None:
            details.append(f"file: {self.file}")
        if self.field is not None:
            details.append(f"field: {self.field}")
        if self.expected is not None:
            details.append(f"expected: {self.expected}")
        if self.found is not None:
            details.append(f"found: {self.found}")
        if details:
            parts.append("; ".join(details) + ".")
        if self.fix:
            parts.append(f"Fix: {self.fix.rstrip()}")
        return "\n".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "error": type(self).__name__,
            "message": self.message,
            "file": self.file,
            "field": self.field,
            "expected": None if self.expected is None else str(self.expected),
            "found": None if self.found is None else str(self.found),
            "fix": self.fix,
        }


class PluginError(LoadstoneError):
    """A plugin could not be used."""


class PluginLoadError(PluginError):
    """A plugin's entry point failed to import or register (raised in strict mode)."""


class PluginConflictError(PluginError):
    """Two plugins registered a component under the same name."""


class ComponentNotFoundError(PluginError):
    """A quantization method, placement strategy or resolver was asked for but is not installed."""


class PluginHookError(PluginError):
    """A plugin's hook or component raised while loadstone was loading a model.

    ``plugin``, ``distribution`` and ``stage`` say who failed and when; ``__cause__`` is the
    original exception.
    """

    def __init__(self, message: str, *, plugin: str, distribution: str | None, stage: str, **kw: Any):
        self.plugin = plugin
        self.distribution = distribution
        self.stage = stage
        super().__init__(message, **kw)


class ResolutionError(LoadstoneError):
    """A reference could not be turned into local files."""


class ConfigError(LoadstoneError):
    """``config.json`` is missing, unreadable or describes an unsupported model."""


class CheckpointError(LoadstoneError):
    """A weights file or shard index is malformed or inconsistent."""


class UnsafeCheckpointError(CheckpointError):
    """The checkpoint needs an unsafe format (pickle) that the caller did not allow."""


class WeightsMismatchError(CheckpointError):
    """The checkpoint's tensors do not match the model architecture (missing, unexpected, wrong shape)."""


class AdapterError(LoadstoneError):
    """An adapter folder is malformed or does not fit its base model."""


class QuantizationError(LoadstoneError):
    """The requested quantization cannot be applied."""


class PlacementError(LoadstoneError):
    """The model cannot be placed as requested."""


class EngineError(LoadstoneError):
    """No engine can run the plan, or the engine asked for cannot (disk offload, pickle weights, a
    quantization backend it cannot drive ...)."""


class OptionError(LoadstoneError, ValueError):
    """An argument to ``load``/``plan`` (or a CLI option) is invalid."""
