"""The normalised arguments of one ``load``/``plan`` call."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

from .errors import OptionError
from .units import map_device, parse_max_memory, shown

DTYPES = ("auto", "bfloat16", "float16", "float32")
DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}

# task name -> transformers Auto class name
TASKS = {
    "causal-lm": "AutoModelForCausalLM",
    "sequence-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "question-answering": "AutoModelForQuestionAnswering",
    "seq2seq-lm": "AutoModelForSeq2SeqLM",
    "feature-extraction": "AutoModel",
}
# peft's task_type -> loadstone task
PEFT_TASKS = {
    "CAUSAL_LM": "causal-lm", "SEQ_CLS": "sequence-classification", "TOKEN_CLS": "token-classification",
    "QUESTION_ANS": "question-answering", "SEQ_2_SEQ_LM": "seq2seq-lm", "FEATURE_EXTRACTION": "feature-extraction",
}


def _env_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


@dataclass
class LoadRequest:
    """Everything ``loadstone.load`` was asked to do, validated.

    Lifecycle hooks receive it (``loadstone_before_load`` may change fields); the load report
    embeds :meth:`to_dict`.
    """

    reference: str
    quantization: str | None = None
    quantization_options: dict[str, Any] = field(default_factory=dict)
    placement: str | dict[str, Any] = "auto"
    dtype: str = "auto"
    trainable: bool = True
    adapters: dict[str, str] = field(default_factory=dict)
    active_adapter: str | None = None
    base: str | None = None
    task: str | None = None
    max_memory: dict[str | int, int] | None = None
    offload_folder: str | None = None
    revision: str | None = None
    cache_dir: str | None = None
    offline: bool = field(default_factory=_env_offline)
    token: str | bool | None = field(default=None, repr=False)
    trust_remote_code: bool = False
    allow_pickle: bool = False
    attn_implementation: str | None = None
    gradient_checkpointing: bool = False
    progress: bool | None = None
    engine: str = "auto"
    engine_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if isinstance(self.reference, os.PathLike):
            self.reference = os.fspath(self.reference)
        if not isinstance(self.reference, str) or not self.reference.strip():
            raise OptionError("the model reference is empty.", field="reference", found=repr(self.reference),
                              fix="pass a local folder, a Hub id such as org/name, or an adapter folder")
        for name in ("revision", "base", "active_adapter", "cache_dir", "offload_folder", "attn_implementation",
                     "task"):
            value = getattr(self, name)
            if isinstance(value, os.PathLike):
                value = os.fspath(value)
                setattr(self, name, value)
            if value is not None and not isinstance(value, str):
                raise OptionError(f"{name} must be text.", field=name, expected="a string (or None)",
                                  found=shown(value),
                                  fix=f"pass {name} as a string")
        for name in ("trainable", "trust_remote_code", "allow_pickle", "gradient_checkpointing", "offline"):
            # "false" is truthy: a string here would silently mean the opposite (trust remote code).
            if not isinstance(getattr(self, name), bool):
                raise OptionError(f"{name} must be True or False.", field=name, expected="a bool",
                                  found=shown(getattr(self, name)),
                                  fix=f"pass {name}=True or {name}=False")
        if self.token is not None and not isinstance(self.token, (str, bool)):
            # never echoed: a token's value is a secret, its type is not
            raise OptionError("token must be text, True or False.", field="token", expected="a str, bool or None",
                              found=f"a {type(self.token).__name__}",
                              fix="pass the Hub token as a string, or True to use the one `hf auth login` saved")
        if self.progress is not None and not isinstance(self.progress, bool):
            raise OptionError("progress must be True, False or None.", field="progress", expected="a bool or None",
                              found=repr(self.progress)[:120], fix="pass progress=False (or True, or None for auto)")
        if isinstance(self.quantization, Mapping):
            options = dict(self.quantization)
            method = options.pop("method", None)
            if not method:
                raise OptionError("a quantization dict needs a 'method' key.", field="quantization",
                                  found=self.quantization, fix='pass e.g. {"method": "nf4", "double_quant": True}')
            self.quantization, self.quantization_options = str(method), {**options, **self.quantization_options}
        if self.quantization is not None and not isinstance(self.quantization, str):
            # str(False) is "False": a method nobody provides, reported as a missing plugin
            raise OptionError("quantization must be a method's name, a dict with a 'method' key, or None.",
                              field="quantization", expected='e.g. "nf4", "int8", "none" (no quantization) or None',
                              found=shown(self.quantization),
                              fix="pass quantization='none' for no quantization, or a method's name")
        if self.quantization is not None:
            method = str(self.quantization).strip().lower()
            # None means "whatever the checkpoint is"; "none" insists on no quantization.
            self.quantization = None if method in {"", "auto"} else ("none" if method in {"no", "off"} else method)
        dtype = str(self.dtype).replace("torch.", "").strip().lower()  # as engine and quantization are read
        dtype = DTYPE_ALIASES.get(dtype, dtype)
        if dtype not in DTYPES:
            raise OptionError(f"unsupported dtype {self.dtype!r}.", field="dtype", expected=", ".join(DTYPES),
                              found=self.dtype, fix="pick one of those; 'auto' keeps the checkpoint's own dtype")
        self.dtype = dtype
        if self.task is not None and self.task not in TASKS:
            raise OptionError(f"unknown task {self.task!r}.", field="task", expected=", ".join(TASKS),
                              found=self.task, fix="pick one of those (default: causal-lm, or the adapter's task_type)")
        if isinstance(self.placement, Mapping):
            if not self.placement:
                raise OptionError("the device map is empty.", field="placement", expected="at least one entry",
                                  found="{}", fix='map "" to a device to place everything there, e.g. {"": "cpu"}')
            for key in self.placement:
                if not isinstance(key, str):
                    raise OptionError("device map keys must be module names.", field="placement",
                                      expected='strings such as "model.layers.0" ("" for the whole model)',
                                      found=shown(key),
                                      fix='write the map like {"model.embed_tokens": 0, "": "cpu"}')
            self.placement = {k: map_device(v, field=f"placement[{k!r}]") for k, v in self.placement.items()}
        elif not isinstance(self.placement, str) or not self.placement:
            raise OptionError("placement must be a strategy name, a device, or a device map.",
                              field="placement", found=repr(self.placement),
                              fix='pass e.g. "auto", "cpu", "cuda:0", "rank" or {"": "cpu"}')
        self.max_memory = parse_max_memory(self.max_memory)
        if isinstance(self.adapters, (list, tuple)):
            self.adapters = parse_adapter_specs(self.adapters)
        if not isinstance(self.adapters, dict):
            raise OptionError("adapters must be a list of references or a dict name -> reference.",
                              field="adapters", found=repr(self.adapters))
        self.adapters = {name: os.fspath(ref) if isinstance(ref, os.PathLike) else ref
                         for name, ref in self.adapters.items()}
        for name, ref in self.adapters.items():
            if not isinstance(ref, str) or not ref.strip():
                raise OptionError(f"adapter {name!r} has no usable reference.", field=f"adapters[{name!r}]",
                                  expected="a folder, Hub id or other reference (text)",
                                  found=shown(ref),
                                  fix="pass adapters={name: path}, or a list of paths")
        for name in self.adapters:
            if not isinstance(name, str) or not name.replace("_", "").replace("-", "").isalnum():
                raise OptionError(f"adapter name {name!r} is not a valid identifier.", field="adapters",
                                  expected="letters, digits, '-' and '_'", found=name,
                                  fix="rename it, e.g. name=path")
        if self.gradient_checkpointing and not self.trainable:
            raise OptionError("gradient_checkpointing only applies to trainable loads; this one has trainable=False.",
                              field="gradient_checkpointing", expected="trainable=True", found="trainable=False",
                              fix="drop gradient_checkpointing (CLI: --gradient-checkpointing) or --frozen")
        if not isinstance(self.engine, str) or not self.engine.strip():
            raise OptionError("engine must be an engine's name, or 'auto'.", field="engine", found=repr(self.engine),
                              fix="pass engine='auto' (default), 'loadstone' or 'transformers' (`loadstone plugins` "
                                  "lists the engines)")
        self.engine = self.engine.strip().lower()
        if not isinstance(self.engine_options, dict):
            raise OptionError("engine_options must be a dict.", field="engine_options",
                              found=repr(self.engine_options), fix='pass e.g. {"readers": 8}')
        if not isinstance(self.quantization_options, dict):
            raise OptionError("quantization_options must be a dict.", field="quantization_options",
                              found=repr(self.quantization_options))
        for field_name, example in (("engine_options", '{"readers": 8}'),
                                    ("quantization_options", '{"double_quant": True}')):
            for key in getattr(self, field_name):
                if not isinstance(key, str):  # else a plugin's own code trips over it, and is blamed
                    raise OptionError(f"{field_name} names its options by text.", field=field_name,
                                      expected="option names as strings", found=shown(key),
                                      fix=f"write the name as text, e.g. {example}")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["token"] = "***" if self.token else None
        if data["max_memory"]:
            data["max_memory"] = {str(k): v for k, v in data["max_memory"].items()}
        return data


def parse_adapter_specs(specs: list[str] | tuple[str, ...]) -> dict[str, str]:
    """``["a=./lora-a", "./lora-b"]`` -> ``{"a": "./lora-a", "adapter_1": "./lora-b"}``."""
    out: dict[str, str] = {}
    for i, spec in enumerate(specs):
        spec = str(spec)
        name, sep, ref = spec.partition("=")
        if not sep or "/" in name or os.sep in name:
            name, ref = f"adapter_{i}" if i else "adapter", spec
        if name in out:
            raise OptionError(f"two adapters are named {name!r}.", field="adapters", found=spec,
                              fix="give each adapter its own name: name=path")
        out[name] = ref
    return out
