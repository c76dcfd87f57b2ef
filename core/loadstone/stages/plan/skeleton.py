"""The model skeleton: the model built on the meta device (shapes and module tree, no memory)."""

from __future__ import annotations

import copy
from typing import Any

from ...contract.request import LoadRequest


class SkeletonFactory:
    """Builds the skeleton exactly as the plan's own was built: ``from_config`` in the load dtype
    under the meta device (parameters and buffers on meta, tied weights tied), the same module tree
    ``from_pretrained`` fills, without running the initialisers (on meta they only cost time).

    The plan's own skeleton is handed out once more (:meth:`keep`): it is read, never changed, by
    the plan stage, and building an 8B skeleton costs a tenth of a second."""

    def __init__(self, auto_class: Any, config: Any, dtype: str, request: LoadRequest):
        self.auto_class, self.config, self.dtype = auto_class, copy.deepcopy(config), dtype
        self.kwargs: dict[str, Any] = {"trust_remote_code": request.trust_remote_code}
        if request.attn_implementation:
            self.kwargs["attn_implementation"] = request.attn_implementation
        self._spare: Any = None

    def build(self) -> Any:
        import torch
        from transformers.initialization import no_init_weights

        from ...faults import TRANSFORMERS_GLOBAL_STATE

        # see faults.py: from_config (and no_init_weights) patch process-wide state
        with TRANSFORMERS_GLOBAL_STATE, torch.device("meta"), no_init_weights():
            return self.auto_class.from_config(copy.deepcopy(self.config), dtype=getattr(torch, self.dtype),
                                               **self.kwargs)

    def keep(self, skeleton: Any) -> None:
        self._spare = skeleton

    def __call__(self) -> Any:
        spare, self._spare = self._spare, None
        return spare if spare is not None else self.build()
