"""The model skeleton: the model built on the meta device (shapes and module tree, no memory)."""

from __future__ import annotations

import copy
from typing import Any, Callable

from ...contract.request import LoadRequest


def skeleton_factory(auto_class: Any, config: Any, dtype: str, request: LoadRequest) -> Callable[[], Any]:
    """A function that builds a fresh skeleton each call, exactly as the plan's own was built:
    ``from_config`` in the load dtype under the meta device (parameters and buffers on meta,
    tied weights tied), the same module tree ``from_pretrained`` fills."""
    config = copy.deepcopy(config)
    kwargs: dict[str, Any] = {"trust_remote_code": request.trust_remote_code}
    if request.attn_implementation:
        kwargs["attn_implementation"] = request.attn_implementation

    def build() -> Any:
        import torch

        from ...faults import TRANSFORMERS_GLOBAL_STATE

        with TRANSFORMERS_GLOBAL_STATE, torch.device("meta"):  # see faults.py: from_config patches globals
            return auto_class.from_config(copy.deepcopy(config), dtype=getattr(torch, dtype), **kwargs)

    return build
