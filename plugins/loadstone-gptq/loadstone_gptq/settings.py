"""What a GPTQ checkpoint says about itself, normalised, and the options a load takes.

GPTQ checkpoints describe themselves in one of two places: ``config.json``'s
``quantization_config`` (transformers, optimum and gptqmodel write it) or, for checkpoints written
by auto-gptq, only a ``quantize_config.json`` next to the weights. Both spell the same settings
in slightly different ways (``format`` or ``checkpoint_format``, ``true_sequential`` at the top or
under ``meta``, ``is_marlin_format``); :func:`settings_from` turns either into one
:class:`GPTQSettings` and refuses what transformers' GPTQ integration cannot load, before any
weight is read.

Importing this module is cheap (no torch, no gptqmodel): ``loadstone plugins`` shows
:data:`OPTION_HELP` while listing plugins.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

from loadstone import ConfigError, OptionError, QuantizationContext, QuantizationError

LEGACY_FILE = "quantize_config.json"
# Bits transformers' GPTQConfig accepts (gptqmodel's torch kernel knows 5-7 too, but only in its
# own planar layout, which no transformers checkpoint uses).
SUPPORTED_BITS = (2, 3, 4, 8)
# Checkpoint formats transformers + optimum load: v1 stores each zero point minus one (auto-gptq's
# historical layout), v2 stores it as it is.
SUPPORTED_FORMATS = ("gptq", "gptq_v2")
AUTO_GPTQ = ("auto-gptq", "auto_gptq", "autogptq")
AUTO_GPTQ_WHY = ("auto-gptq is archived upstream and its last release (0.7.1) fails to import with transformers 5 "
                 "(ImportError: cannot import name 'no_init_weights'); gptqmodel reads the same checkpoints "
                 "(quantize_config.json, desc_act, sym, v1 zero points) and runs them instead")

OPTION_HELP = {
    "backend": "gptqmodel kernel, as transformers' GPTQConfig(backend=...): 'auto' (default: loadstone picks "
               "gptq_torch on the CPU and for training, gptqmodel's fastest kernel on GPUs for inference), "
               "'auto_trainable', or a gptqmodel backend such as gptq_torch, gptq_triton, gptq_torch_aten, "
               "gptq_exllama_v2, gptq_marlin (the last two: inference only, CUDA)",
}


@dataclass(frozen=True)
class GPTQSettings:
    """One GPTQ checkpoint's settings, as every GPTQ writer means them."""

    bits: int
    group_size: int  # -1: one group per column (the whole input dimension)
    desc_act: bool  # act-order: columns quantized in decreasing activation order, groups given by g_idx
    sym: bool
    true_sequential: bool
    checkpoint_format: str  # "gptq" (v1 zero points) or "gptq_v2"
    damp_percent: float | None = None
    quantizer: tuple[str, ...] = ()  # who wrote it ("gptqmodel:7.6.0", "auto_gptq:0.7.1")
    backend: str = "auto"  # the kernel asked for (the user's option)
    source: str = "config.json"  # or LEGACY_FILE

    @property
    def zero_point_convention(self) -> str:
        return "v1 (stored zero point = zero point - 1)" if self.checkpoint_format == "gptq" else "v2 (as it is)"

    def groups(self, in_features: int) -> int:
        size = in_features if self.group_size == -1 else self.group_size
        return -(-in_features // size)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["quantizer"] = list(self.quantizer)
        out["zero_points"] = self.zero_point_convention
        return out


def config_file(ctx: QuantizationContext) -> str:
    """The file a pre-quantized checkpoint's settings came from, for error messages."""
    folder = Path(str(getattr(ctx.model_config, "_name_or_path", "") or "."))
    legacy = folder / LEGACY_FILE
    try:
        raw = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raw = {}
    if legacy.is_file() and not raw.get("quantization_config"):
        return str(legacy)
    return str(folder / "config.json")


# ------------------------------------------------------------------ reading quantize_config.json


def read_legacy(folder: Path) -> dict[str, Any] | None:
    """The ``quantization_config`` equivalent of an auto-gptq ``quantize_config.json``, or ``None``
    when the folder has none or it describes another method."""
    path = Path(folder) / LEGACY_FILE
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"{LEGACY_FILE} cannot be read: {exc}.", file=path, field=LEGACY_FILE,
                          expected="the JSON object auto-gptq or gptqmodel wrote", found=type(exc).__name__,
                          fix="repair or re-download quantize_config.json") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{LEGACY_FILE} holds {type(raw).__name__}, not a JSON object.", file=path,
                          field=LEGACY_FILE, expected="a JSON object", found=type(raw).__name__,
                          fix="repair or re-download quantize_config.json")
    method = str(raw.get("quant_method", "gptq")).lower()
    if method != "gptq":
        return None
    meta = raw.get("meta") if isinstance(raw.get("meta"), dict) else {}
    out: dict[str, Any] = {"quant_method": "gptq"}
    for key in ("bits", "group_size", "desc_act", "sym", "damp_percent", "static_groups", "lm_head", "dynamic",
                "pack_dtype", "backend"):
        if key in raw:
            out[key] = raw[key]
    out["true_sequential"] = raw.get("true_sequential", meta.get("true_sequential", True))
    if raw.get("is_marlin_format"):
        out["format"] = "marlin"
    else:
        out["format"] = str(raw.get("checkpoint_format", raw.get("format", "gptq"))).lower()
    # auto-gptq wrote no writer tag; say who did, for the report.
    out["meta"] = {**meta, "quantizer": meta.get("quantizer") or ["auto_gptq (quantize_config.json)"]}
    return out


# ------------------------------------------------------------------ normalising a checkpoint's config


def _bad_config(ctx: QuantizationContext, key: str, found: Any, expected: str, fix: str) -> ConfigError:
    return ConfigError(f"this GPTQ checkpoint's {key}={found!r} cannot be loaded.", file=config_file(ctx),
                       field=f"quantization_config.{key}", expected=expected, found=repr(found), fix=fix)


def _integer(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def settings_from(ctx: QuantizationContext) -> GPTQSettings:
    """The settings of the pre-quantized checkpoint this load reads, validated."""
    config = dict(ctx.checkpoint_config or {})
    meta = config.get("meta") if isinstance(config.get("meta"), dict) else {}
    bits = _integer(config.get("bits"))
    if bits not in SUPPORTED_BITS:
        raise _bad_config(ctx, "bits", config.get("bits"), ", ".join(map(str, SUPPORTED_BITS)),
                          "transformers' GPTQ integration loads 2-, 3-, 4- and 8-bit GPTQ checkpoints only; "
                          "re-quantize the original model with one of those (loadstone_gptq.quantize)")
    group_size = _integer(config.get("group_size", 128))
    if group_size is None or not (group_size == -1 or group_size > 0):
        raise _bad_config(ctx, "group_size", config.get("group_size"), "a positive integer, or -1 (one group "
                          "per column)", "write the group size the checkpoint was quantized with")
    fmt = str(config.get("checkpoint_format") or config.get("format") or "gptq").lower()
    if fmt not in SUPPORTED_FORMATS:
        raise _bad_config(ctx, "checkpoint_format", fmt, ", ".join(SUPPORTED_FORMATS),
                          "transformers' GPTQ integration reads the gptq (v1) and gptq_v2 layouts only; "
                          "re-save the model in the gptq format with gptqmodel")
    if config.get("lm_head"):
        raise _bad_config(ctx, "lm_head", True, "false (lm_head not quantized)",
                          "transformers' GPTQ integration quantizes only the layers inside the decoder blocks; "
                          "load this checkpoint with gptqmodel's own GPTQModel.load")
    if config.get("dynamic"):
        raise _bad_config(ctx, "dynamic", config.get("dynamic"), "no per-module overrides",
                          "transformers' GPTQ integration applies one bits/group size to every layer; load "
                          "this checkpoint with gptqmodel's own GPTQModel.load")
    pack_dtype = str(config.get("pack_dtype", meta.get("pack_dtype", "int32"))).replace("torch.", "")
    if pack_dtype != "int32":
        raise _bad_config(ctx, "pack_dtype", pack_dtype, "int32", "re-save the checkpoint with gptqmodel's "
                          "default pack_dtype (int32), which transformers' GPTQ integration reads")
    flags = {}
    for key, default in (("desc_act", False), ("sym", True)):
        value = config.get(key, default)
        if not isinstance(value, bool):
            raise _bad_config(ctx, key, value, "true or false", f"write {key} as a JSON boolean")
        flags[key] = value
    quantizer = meta.get("quantizer") or ()
    quantizer = (quantizer,) if isinstance(quantizer, str) else tuple(str(q) for q in quantizer)
    damp = config.get("damp_percent", meta.get("damp_percent"))
    return GPTQSettings(
        bits=bits, group_size=group_size, desc_act=flags["desc_act"], sym=flags["sym"],
        true_sequential=bool(config.get("true_sequential", meta.get("true_sequential", True))),
        checkpoint_format=fmt, damp_percent=float(damp) if isinstance(damp, (int, float)) else None,
        quantizer=quantizer, backend=str(ctx.options.get("backend", "auto")),
        source=LEGACY_FILE if config_file(ctx).endswith(LEGACY_FILE) else "config.json")


def checkpoint_asks_for_auto_gptq(config: Mapping[str, Any]) -> bool:
    """Whether a checkpoint's config names the auto-gptq runtime as the kernel to run it with."""
    return str(config.get("backend") or "").lower() in AUTO_GPTQ


# ------------------------------------------------------------------ the user's options


def normalize(method: str, options: Mapping[str, Any], ctx: QuantizationContext | None) -> dict[str, Any]:
    """Validate the user's options; refuse loads GPTQ cannot do (quantize on load, auto-gptq)."""
    if str(options.get("backend", "")).lower() in AUTO_GPTQ:
        raise QuantizationError(
            f"backend={options['backend']!r} asks for the auto-gptq runtime, which loadstone does not run: "
            f"{AUTO_GPTQ_WHY}.", field="quantization option backend",
            expected="backend='auto' or a gptqmodel kernel (gptq_torch, gptq_triton, gptq_marlin ...)",
            found=options["backend"],
            fix="drop the backend option: loadstone loads auto-gptq checkpoints with gptqmodel (a checkpoint's own "
                "quantize_config.json is read automatically)")
    if ctx is not None and not ctx.pre_quantized:
        raise QuantizationError(
            "GPTQ is not applied while loading: it needs calibration texts and minutes per billion parameters, "
            "so it runs once, ahead of time, and the result is loaded like any GPTQ checkpoint.",
            field="quantization", expected="a GPTQ checkpoint (config.json quantization_config or "
            "quantize_config.json), or quantization='nf4'/'int8' to quantize on load", found=method,
            fix="quantize it first: loadstone_gptq.quantize(model_folder, output_folder, calibration=[...]) or "
                "`loadstone-gptq quantize MODEL OUTPUT --calibration texts.txt`, then load the output folder")
    out: dict[str, Any] = {}
    for name, value in options.items():
        if name == "backend":
            if not isinstance(value, str) or not value.strip():
                raise OptionError(f"GPTQ option backend={value!r} is not valid.", field="quantization option backend",
                                  expected="a gptqmodel backend name such as 'auto' or 'gptq_torch'", found=repr(value),
                                  fix="pass backend='auto' or a gptqmodel backend name")
            out[name] = value.strip().lower()
    return out
