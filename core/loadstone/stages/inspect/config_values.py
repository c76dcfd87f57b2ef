"""Checking ``config.json``'s values before transformers sees them.

transformers validates the types of the fields its config classes declare (and loadstone turns
its refusal into a :class:`~loadstone.ConfigError`), but it accepts values no model can be built
from: zero or negative sizes (a negative hidden size fails deep inside torch, a zero head count
divides by zero), a ``quantization_config`` that is a string, a ``dtype`` naming no floating
dtype. And it trusts the sizes: a config with 10**7 layers makes transformers build a 10**7-entry
``layer_types`` list and then 10**7 layers, before anything compares the config with the
weights. :func:`check_config_values` refuses all of this, and compares every layer count with
the layers the safetensors headers hold, so that the cost of a plan is bounded by the size of the
checkpoint, not by what the config claims.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ...contract.checkpoint import CheckpointInventory
from ...contract.errors import ConfigError, WeightsMismatchError

#: Sizes every model needs to be at least 1 (under their own name or the config class's alias), as
#: a number, or one per stage or layer (Swin's ``num_heads: [3, 6, 12, 24]``, Lxmert's layer counts
#: per tower). Other sizes (``head_dim: 0`` means "computed" in some models, ``-1`` is a sentinel in
#: others) are transformers' to judge; what it cannot build from is refused when the skeleton is built.
POSITIVE = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size",
            "max_position_embeddings", "num_key_value_heads")
#: Floating dtypes a config.json may declare as the checkpoint's own (``"auto"``: say nothing).
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
_INDEX = re.compile(r"(?:^|\.)(\d+)(?=\.|$)")


def checkpoint_layer_bound(inventory: CheckpointInventory | None) -> int | None:
    """How many layers the checkpoint can hold at most: one more than the largest number that is a
    component of a tensor name (``model.layers.31.mlp...`` -> 32); ``None`` when no tensor name
    holds a number (nothing to compare with)."""
    if inventory is None:
        return None
    largest = -1
    for name in inventory.tensors:
        for match in _INDEX.finditer(name):
            largest = max(largest, int(match.group(1)))
    return largest + 1 if largest >= 0 else None


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _aliases(config_class: Any, canonical: str) -> set[str]:
    """The names a config class stores ``canonical`` under (GPT-2: ``num_hidden_layers`` -> ``n_layer``)."""
    stored = (getattr(config_class, "attribute_map", None) or {}).get(canonical)
    return {canonical} | ({stored} if isinstance(stored, str) else set())


def _sub_config_classes(config_class: Any, raw: dict[str, Any]) -> dict[str, Any]:
    """Keys of ``raw`` holding a nested model config (``text_config``...) -> that config's class."""
    from transformers import CONFIG_MAPPING

    out = {}
    for key, sub in (getattr(config_class, "sub_configs", None) or {}).items():
        value = raw.get(key)
        if not isinstance(value, dict):
            continue
        nested_type = value.get("model_type")
        if isinstance(nested_type, str) and nested_type in CONFIG_MAPPING:
            out[key] = CONFIG_MAPPING[nested_type]
        elif isinstance(sub, type) and hasattr(sub, "attribute_map"):
            out[key] = sub
    return out


def check_config_values(raw: dict[str, Any], path: Path, config_class: Any,
                        inventory: CheckpointInventory | None) -> None:
    """Refuse values of ``raw`` (config.json of a ``config_class`` model) that no model can be built
    from, and layer counts the checkpoint cannot hold. ``model_type`` was checked already."""
    _check_top_level(raw, path)
    _check_sizes(raw, path, config_class, "", checkpoint_layer_bound(inventory), inventory)


def _check_top_level(raw: dict[str, Any], path: Path) -> None:
    def refuse(field: str, expected: str, value: Any, fix: str) -> ConfigError:
        return ConfigError(f"config.json: {field} must be {expected}.", file=path, field=field, expected=expected,
                           found=f"{value!r} ({_kind(value)})"[:200], fix=fix)

    architectures = raw.get("architectures")
    if architectures is not None and not (isinstance(architectures, list)
                                          and all(isinstance(a, str) and a for a in architectures)):
        raise refuse("architectures", "a list of class names, e.g. [\"LlamaForCausalLM\"]", architectures,
                     "write the model class save_pretrained recorded, or drop the field")
    auto_map = raw.get("auto_map")
    if auto_map is not None and not (isinstance(auto_map, dict) and all(
            isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, (str, type(None))) for x in v))
            for v in auto_map.values())):
        raise refuse("auto_map", "an object mapping Auto classes to \"module.Class\" names", auto_map,
                     "repair or re-download config.json")
    qconfig = raw.get("quantization_config")
    if qconfig is not None:
        if not isinstance(qconfig, dict):
            raise refuse("quantization_config", "an object such as {\"quant_method\": \"bitsandbytes\", ...}", qconfig,
                         "write the quantization_config the quantizer saved, or drop it if the checkpoint is not "
                         "pre-quantized")
        method = qconfig.get("quant_method")
        if method is not None and not (isinstance(method, str) and method):
            raise refuse("quantization_config.quant_method", "the name of a quantization format (a string)", method,
                         "write the quant_method the quantizer saved, e.g. \"bitsandbytes\" or \"gptq\"")
    for key in ("dtype", "torch_dtype"):
        declared = raw.get(key)
        if declared is None:
            continue
        name = declared.replace("torch.", "") if isinstance(declared, str) else None
        if name not in (*FLOAT_DTYPES, "auto"):
            raise refuse(key, "the checkpoint's floating dtype: " + ", ".join(FLOAT_DTYPES), declared,
                         "write the dtype the weights are stored in (e.g. \"bfloat16\"), or drop the field; a "
                         "quantized checkpoint says so in quantization_config, not in dtype")


def _all_positive(value: Any) -> bool:
    values = value if isinstance(value, list) else list(value.values()) if isinstance(value, dict) else [value]
    return bool(values) and all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 1 for v in values)


def _check_sizes(raw: dict[str, Any], path: Path, config_class: Any, prefix: str, layer_bound: int | None,
                 inventory: CheckpointInventory | None) -> None:
    positive = {alias: canonical for canonical in POSITIVE for alias in _aliases(config_class, canonical)}
    layer_keys = _aliases(config_class, "num_hidden_layers")
    for key, value in raw.items():
        field = prefix + key
        if key in positive and value is not None and not _all_positive(value):
            raise ConfigError(
                f"config.json: {field} must be a positive integer.", file=path, field=field,
                expected="an integer >= 1 (or one per layer or stage)", found=f"{value!r} ({_kind(value)})"[:200],
                fix="write the value save_pretrained recorded for this model (compare with the model card)")
        if key in layer_keys and layer_bound is not None and isinstance(value, int) and value > layer_bound:
            where = inventory.index_file or (inventory.files[0] if inventory.files else path.parent)
            raise WeightsMismatchError(
                f"config.json declares {value} layers ({field}), but the weights hold at most {layer_bound}: "
                f"no tensor name in {Path(where).name} has an index of {layer_bound} or more.", file=path,
                field=field, expected=f"at most {layer_bound} (the layers the safetensors headers hold)",
                found=value, fix="check that config.json and the weights belong together (same model size); if "
                                 "the checkpoint is damaged, re-download or re-save it")
    for key, sub_class in _sub_config_classes(config_class, raw).items():
        _check_sizes(raw[key], path, sub_class, f"{prefix}{key}.", layer_bound, inventory)
