"""The backend's options: names, help, validation, and the settings a load resolves them to.

Importing this module is cheap (no torch, no bitsandbytes): ``loadstone plugins`` shows
:data:`OPTION_HELP` while listing plugins.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from loadstone import ConfigError, OptionError, QuantizationContext

FOUR_BIT = ("nf4", "fp4")
METHODS = (*FOUR_BIT, "int8")

# Modules every load keeps in full precision: the output head (quantizing it costs accuracy for
# little memory, and transformers keeps it too). User names are added to these, never replace them.
DEFAULT_KEEP = ("lm_head",)

FLOAT_DTYPES = ("bfloat16", "float16", "float32")
STORAGE_DTYPES = ("uint8", *FLOAT_DTYPES)
DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}

OPTION_HELP = {
    "compute_dtype": "4-bit: dtype of the matmuls: bfloat16, float16 or float32 (default: the load dtype)",
    "double_quant": "4-bit: quantize the per-block scales too, saving ~0.37 bits per parameter (default: true)",
    "quant_storage": "4-bit: dtype the packed weights are stored as: uint8 (default), bfloat16, float16, float32; "
                     "FSDP needs it equal to the model dtype",
    "keep_modules": "modules kept in full precision besides lm_head: a list or comma-separated names, matched as "
                    "transformers' llm_int8_skip_modules (e.g. [\"mlp.gate\"])",
    "threshold": "int8: outlier threshold of the mixed-precision matmul (default: 6.0; 0 disables outlier handling)",
    "cpu_offload": "allow device maps that put modules on cpu/disk next to an accelerator; those modules stay "
                   "unquantized in the load dtype (transformers' llm_int8_enable_fp32_cpu_offload; default: false)",
    "cpu_kernel": "4-bit on the CPU: generic (default) or packed, bitsandbytes' AVX512-BF16 inference kernel for "
                  "trainable=False loads (faster; its repack is permanent and rounds the scales to bf16)",
    "cpu_quantizer": "4-bit on the CPU: chunked (default: loadstone's chunked kernel, 2.5-4x faster, equal bit for "
                     "bit to bitsandbytes' quantize_4bit and checked against it once per process) or bitsandbytes "
                     "(its own op)",
    "upcast": "training preparation: cast non-quantized fp16/bf16 parameters to float32 as "
              "peft.prepare_model_for_kbit_training does (default: true)",
}
ONLY_FOR = {"compute_dtype": FOUR_BIT, "double_quant": FOUR_BIT, "quant_storage": FOUR_BIT, "threshold": ("int8",),
            "cpu_kernel": FOUR_BIT, "cpu_quantizer": FOUR_BIT}
CPU_KERNELS = ("generic", "packed")
CHUNKED = "chunked"  # cpu_quantizer: loadstone_bnb.cpu_quantize (which imports torch when imported)
CPU_QUANTIZERS = (CHUNKED, "bitsandbytes")


@dataclass(frozen=True)
class BnbSettings:
    """What one load does, resolved from the user's options or a pre-quantized checkpoint's config."""

    method: str
    compute_dtype: str | None = None  # None: the dtype the model is loaded in
    double_quant: bool = True
    quant_storage: str = "uint8"
    keep_modules: tuple[str, ...] = DEFAULT_KEEP
    threshold: float = 6.0
    cpu_offload: bool = False
    upcast: bool = True
    cpu_kernel: str = "generic"
    cpu_quantizer: str = CHUNKED

    @property
    def four_bit(self) -> bool:
        return self.method in FOUR_BIT

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.method, "keep_modules": list(self.keep_modules),
                               "cpu_offload": self.cpu_offload, "upcast": self.upcast}
        if self.four_bit:
            out.update(compute_dtype=self.compute_dtype, double_quant=self.double_quant,
                       quant_storage=self.quant_storage, cpu_kernel=self.cpu_kernel,
                       cpu_quantizer=self.cpu_quantizer)
        else:
            out["threshold"] = self.threshold
        return out


def _bad(name: str, value: Any, expected: str, fix: str | None = None) -> OptionError:
    return OptionError(f"bitsandbytes option {name}={value!r} is not valid.", field=f"quantization option {name}",
                       expected=expected, found=repr(value), fix=fix or f"pass {name}= one of: {expected}")


def _dtype(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    text = str(value).replace("torch.", "").strip().lower()
    text = DTYPE_ALIASES.get(text, text)
    if text not in allowed:
        raise _bad(name, value, ", ".join(allowed))
    return text


def _flag(name: str, value: Any) -> bool:
    # Strings are accepted because CLI users write -o double_quant=false and JSON configs vary.
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in {"1", "true", "yes", "on"}:
        return True
    if text in {"0", "false", "no", "off"}:
        return False
    raise _bad(name, value, "true or false")


def _names(name: str, value: Any) -> tuple[str, ...]:
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(i, str) and i.strip() for i in items):
        raise _bad(name, value, 'a list of module names such as ["mlp.gate", "score"]')
    return tuple(i.strip() for i in items)


def _threshold(name: str, value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise _bad(name, value, "a number >= 0, e.g. 6.0") from None
    if isinstance(value, bool) or not number >= 0:  # `not >=` also rejects NaN
        raise _bad(name, value, "a number >= 0, e.g. 6.0")
    return number


def _choice(choices: tuple[str, ...]) -> Any:
    def parse(name: str, value: Any) -> str:
        text = str(value).strip().lower()
        if text not in choices:
            raise _bad(name, value, ", ".join(choices))
        return text
    return parse


PARSERS = {
    "compute_dtype": lambda n, v: _dtype(n, v, FLOAT_DTYPES),
    "quant_storage": lambda n, v: _dtype(n, v, STORAGE_DTYPES),
    "double_quant": _flag, "cpu_offload": _flag, "upcast": _flag,
    "keep_modules": _names, "threshold": _threshold, "cpu_kernel": _choice(CPU_KERNELS),
    "cpu_quantizer": _choice(CPU_QUANTIZERS),
}


def normalize(method: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """Validate the user's options for ``method`` and return them in canonical form.

    Defaults are not filled in here: for a pre-quantized checkpoint they come from its config,
    which this step does not see (see :func:`resolve`).
    """
    out: dict[str, Any] = {}
    for name, value in options.items():
        methods = ONLY_FOR.get(name)
        if methods and method not in methods:
            raise OptionError(
                f"bitsandbytes option {name!r} applies to {' and '.join(methods)} only, not to {method!r}.",
                field=f"quantization option {name}", expected=f"options of {method}: "
                + ", ".join(n for n in OPTION_HELP if method in ONLY_FOR.get(n, METHODS)),
                found=name, fix=f"remove {name}, or quantize with {' or '.join(methods)}")
        out[name] = PARSERS[name](name, value)
    return out


def from_checkpoint(config: Mapping[str, Any]) -> BnbSettings:
    """The settings a pre-quantized checkpoint was saved with (``config.json`` quantization_config)."""
    keep = config.get("llm_int8_skip_modules")
    return BnbSettings(
        method=checkpoint_method(config),
        compute_dtype=_dtype("bnb_4bit_compute_dtype", config.get("bnb_4bit_compute_dtype") or "float32", FLOAT_DTYPES),
        double_quant=bool(config.get("bnb_4bit_use_double_quant", False)),
        quant_storage=_dtype("bnb_4bit_quant_storage", config.get("bnb_4bit_quant_storage") or "uint8", STORAGE_DTYPES),
        # transformers' own default (None) keeps the output head: the same as ours.
        keep_modules=tuple(keep) if keep else DEFAULT_KEEP,
        threshold=float(config.get("llm_int8_threshold", 6.0)),
        cpu_offload=bool(config.get("llm_int8_enable_fp32_cpu_offload", False)),
    )


def checkpoint_method(config: Mapping[str, Any]) -> str:
    """``nf4``, ``fp4`` or ``int8`` for a bitsandbytes ``quantization_config``."""
    # transformers writes both the public and the underscored flags; older checkpoints only one.
    if config.get("load_in_4bit") or config.get("_load_in_4bit"):
        quant_type = str(config.get("bnb_4bit_quant_type") or "fp4").lower()
        if quant_type not in FOUR_BIT:
            raise ConfigError(f"the checkpoint's bnb_4bit_quant_type {quant_type!r} is not one bitsandbytes knows.",
                              field="quantization_config.bnb_4bit_quant_type", expected="nf4 or fp4",
                              found=quant_type, fix="repair config.json, or re-save the checkpoint")
        return quant_type
    if config.get("load_in_8bit") or config.get("_load_in_8bit"):
        return "int8"
    raise ConfigError("the checkpoint says it is quantized with bitsandbytes but sets neither load_in_4bit nor "
                      "load_in_8bit.", field="quantization_config", expected="load_in_4bit or load_in_8bit true",
                      found={k: v for k, v in config.items() if "load_in" in k},
                      fix="repair config.json, or re-save the checkpoint with save_pretrained")


def resolve(ctx: QuantizationContext) -> BnbSettings:
    """The settings of this load: the user's options over our defaults, or, for a pre-quantized
    checkpoint, its own settings (options may only repeat them: the packed weights are fixed)."""
    options = dict(ctx.options)
    if not ctx.pre_quantized:
        if "keep_modules" in options:
            options["keep_modules"] = DEFAULT_KEEP + tuple(m for m in options["keep_modules"] if m not in DEFAULT_KEEP)
        return BnbSettings(method=ctx.method, **options)
    saved = from_checkpoint(ctx.checkpoint_config or {})
    upcast = options.pop("upcast", True)  # a training choice, not a property of the weights
    cpu_kernel = options.pop("cpu_kernel", "generic")  # a runtime choice, likewise
    options.pop("cpu_quantizer", None)  # nothing is quantized: the packed weights are loaded as they are
    for name, value in options.items():
        have = getattr(saved, name)
        if name == "keep_modules":
            value, have = set(value) | set(DEFAULT_KEEP), set(have)
        if value != have:
            raise OptionError(
                f"the checkpoint is already quantized with bitsandbytes ({saved.method}) and was saved with "
                f"{name}={_show(have)}; loading cannot change that.", field=f"quantization option {name}",
                expected=_show(have), found=_show(value),
                fix=f"drop the {name} option, or quantize the original unquantized checkpoint with it")
    return BnbSettings(**{**saved.__dict__, "upcast": upcast, "cpu_kernel": cpu_kernel})


def _show(value: Any) -> str:
    return repr(sorted(value)) if isinstance(value, (set, tuple)) else repr(value)
