"""Reading ``config.json`` safely: refusing remote code unless allowed, typed errors for
everything transformers cannot read."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ...contract.checkpoint import CheckpointInventory
from ...contract.errors import ConfigError
from ...contract.request import TASKS, LoadRequest
from ...contract.units import shown
from ...jsonfile import read_json_object
from .config_values import check_config_values

CONFIG = "config.json"


def read_raw_config(folder: Path) -> dict[str, Any]:
    return read_json_object(
        folder / CONFIG, ConfigError, missing=f"{folder} has no {CONFIG}.",
        expected="the config.json written by save_pretrained",
        missing_fix="point at the model folder (the one holding config.json and the weights)",
        repair_fix="repair or re-download config.json")


_transformers_ready = False


def import_transformers() -> None:
    """Import transformers and the lazy attributes loadstone uses, once, under the model-building lock.

    transformers resolves ``from transformers import X`` through a lazy module that is not
    thread-safe on first use: threads starting loads at the same moment in a fresh process saw
    ``ImportError: cannot import name 'CONFIG_MAPPING'``.
    """
    global _transformers_ready
    if _transformers_ready:
        return
    from ...faults import TRANSFORMERS_GLOBAL_STATE

    with TRANSFORMERS_GLOBAL_STATE:
        if not _transformers_ready:
            import transformers
            import transformers.integrations.accelerate  # noqa: F401  (placement)

            for name in ("CONFIG_MAPPING", "AutoConfig", "PreTrainedModel", *TASKS.values()):
                getattr(transformers, name)
            _transformers_ready = True


def load_config(folder: Path, request: LoadRequest, inventory: CheckpointInventory | None = None) -> Any:
    """``AutoConfig`` for the folder, refusing remote code unless it was allowed, and values no
    model can be built from (see :mod:`.config_values`; layer counts are compared with
    ``inventory``'s tensor names)."""
    import_transformers()
    raw = read_raw_config(folder)
    path = folder / CONFIG
    model_type = raw.get("model_type")
    from transformers import CONFIG_MAPPING

    if not isinstance(model_type, str) or not model_type:
        raise ConfigError(f"{CONFIG} names no model_type.", file=path, field="model_type",
                          expected="a model type name such as \"llama\"",
                          found=shown(model_type, 200),
                          fix="write the model_type save_pretrained recorded (see the model card)")
    check_config_values(raw, path, CONFIG_MAPPING[model_type] if model_type in CONFIG_MAPPING else None, inventory)
    auto_map = raw.get("auto_map") or {}
    if model_type not in CONFIG_MAPPING:
        if auto_map and not request.trust_remote_code:
            modules = sorted({str(v).split(".")[0] + ".py" for v in auto_map.values() if isinstance(v, str)})
            raise ConfigError(
                f"{CONFIG} declares model_type {model_type!r}, which transformers does not know; the checkpoint "
                f"ships its own code, and trust_remote_code is off.", file=path, field="model_type",
                expected="a model type built into transformers", found=model_type,
                fix=f"enabling trust_remote_code would import and run {', '.join(modules) or 'the files in auto_map'} "
                    f"from {folder} with your privileges; pass trust_remote_code=True (CLI: --trust-remote-code) only "
                    f"if you have reviewed that code")
        if not auto_map:
            raise ConfigError(
                f"{CONFIG} declares model_type {model_type!r}, which this transformers does not know.", file=path,
                field="model_type", expected="a model type built into transformers", found=model_type,
                fix="upgrade transformers, or fix model_type; (trust_remote_code is off and the checkpoint ships "
                    "no code of its own, so enabling it would not help)")
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(folder), trust_remote_code=request.trust_remote_code,
                                          local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - whatever transformers raises here, config.json's values caused it
        raise config_value_error(exc, path) from exc


_FIELD = re.compile(r"field '([^']+)'")


def config_value_error(exc: BaseException, path: Path) -> ConfigError:
    """transformers' refusal of a config.json value as a ConfigError naming the field where it says
    which (its strict dataclass validation: ``Validation error for field 'hidden_size': TypeError:
    Field 'hidden_size' expected int, got str``)."""
    text = str(exc).strip()
    field = _FIELD.search(text)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    found = (lines[-1] if lines else type(exc).__name__)[:300]
    return ConfigError(f"transformers cannot use a value of {CONFIG} ({type(exc).__name__}).", file=path,
                       field=field.group(1) if field else "(config values)",
                       expected="a value of the type the model's config class declares", found=found,
                       fix="compare config.json with one written by save_pretrained for this model type")


