"""The model skeleton: the model built on the meta device (shapes and module tree, no memory)."""

from __future__ import annotations

import copy
import threading
from pathlib import Path
from typing import Any

from ...contract.errors import ConfigError, LoadstoneError, OptionError
from ...contract.request import LoadRequest

#: Modules a skeleton may have per checkpoint tensor, plus a fixed allowance. A transformers model
#: has one or two modules per tensor (a Linear holds one or two tensors, activations and rotary
#: embeddings none); the bound only stops a config that describes a model vastly larger than its
#: weights from being built at all (see :func:`module_budget`).
MODULES_PER_TENSOR = 64
MODULE_ALLOWANCE = 10_000


def module_budget(tensor_count: int) -> int | None:
    """The most modules a skeleton for a checkpoint of ``tensor_count`` tensors may have (``None``:
    no tensor list to compare with, no bound)."""
    return MODULES_PER_TENSOR * tensor_count + MODULE_ALLOWANCE if tensor_count else None


class SkeletonFactory:
    """Builds the skeleton exactly as the plan's own was built: ``from_config`` in the load dtype
    under the meta device (parameters and buffers on meta, tied weights tied), the same module tree
    ``from_pretrained`` fills, without running the initialisers (on meta they only cost time).

    The plan's own skeleton is handed out once more (:meth:`keep`): it is read, never changed, by
    the plan stage, and building an 8B skeleton costs a tenth of a second.

    Whatever transformers raises while building is the config's doing: a
    :class:`~loadstone.ConfigError` naming ``config_path``. ``max_modules`` stops a build once it
    has registered that many modules (a config far larger than its checkpoint)."""

    def __init__(self, auto_class: Any, config: Any, dtype: str, request: LoadRequest, *,
                 config_path: Path | None = None, max_modules: int | None = None):
        self.auto_class, self.config, self.dtype = auto_class, copy.deepcopy(config), dtype
        self.kwargs: dict[str, Any] = {"trust_remote_code": request.trust_remote_code}
        if request.attn_implementation:
            self.kwargs["attn_implementation"] = request.attn_implementation
        self.config_path, self.max_modules = config_path, max_modules
        self._spare: Any = None

    def build(self) -> Any:
        import torch
        from transformers.initialization import no_init_weights

        from ...faults import TRANSFORMERS_GLOBAL_STATE

        # see faults.py: from_config (and no_init_weights) patch process-wide state
        with TRANSFORMERS_GLOBAL_STATE, torch.device("meta"), no_init_weights(), \
                _ModuleCounter(self.max_modules, self.config_path):
            try:
                return self.auto_class.from_config(copy.deepcopy(self.config), dtype=getattr(torch, self.dtype),
                                                   **self.kwargs)
            except LoadstoneError:
                raise
            except Exception as exc:  # noqa: BLE001 - transformers and torch raise plain errors for bad sizes
                lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
                asked = self.kwargs.get("attn_implementation")
                if asked and "attn_implementation" in str(exc):  # the argument, not config.json
                    said = (lines[-1] if lines else type(exc).__name__)[:400]
                    raise OptionError(
                        f"transformers cannot build {self.auto_class.__name__} with attn_implementation={asked!r}: "
                        f"{said}", field="attn_implementation", found=asked,
                        expected="an attention implementation transformers supports for this model here",
                        fix="pass one this model and machine support ('sdpa', 'eager' ...), or leave it out "
                            "(CLI: --attn-implementation)") from exc
                raise ConfigError(
                    f"transformers cannot build {self.auto_class.__name__} from config.json: {type(exc).__name__}.",
                    file=self.config_path, field="(config values)", expected="sizes a model can be built from",
                    found=(lines[-1] if lines else type(exc).__name__)[:300],
                    fix="compare config.json with one written by save_pretrained for this model type") from exc

    def keep(self, skeleton: Any) -> None:
        self._spare = skeleton

    def __call__(self) -> Any:
        spare, self._spare = self._spare, None
        return spare if spare is not None else self.build()


class _ModuleCounter:
    """Counts the modules the current thread registers (torch's global registration hook) and
    refuses the build past ``limit``. Builds run one at a time (TRANSFORMERS_GLOBAL_STATE)."""

    def __init__(self, limit: int | None, config_path: Path | None):
        self.limit, self.config_path = limit, config_path
        self.count, self.thread, self.handle = 0, threading.get_ident(), None

    def __enter__(self) -> "_ModuleCounter":
        if self.limit is not None:
            from torch.nn.modules.module import register_module_module_registration_hook

            self.handle = register_module_module_registration_hook(self._registered)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.handle is not None:
            self.handle.remove()

    def _registered(self, module: Any, name: str, submodule: Any) -> None:
        if threading.get_ident() != self.thread:
            return
        self.count += 1
        if self.count > self.limit:
            raise ConfigError(
                f"config.json describes a model of more than {self.limit} modules, far more than its checkpoint "
                f"holds tensors for; building it was stopped.", file=self.config_path,
                field="(model sizes: layers, experts, blocks)",
                expected=f"at most {MODULES_PER_TENSOR} modules per checkpoint tensor",
                found=f"more than {self.limit} modules",
                fix="check that config.json and the weights belong together (same model size)")
