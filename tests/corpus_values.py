"""Malformed inputs that parse: JSON of the wrong shape or type, values no model can be built from,
adapter configs that disagree with their tensors, tensor dtypes that cannot fill their
parameters, bad references. One :class:`corpus.Case` per class of input (issue 7, section 2);
``tests/test_validation_corpus.py`` runs ``plan`` and ``load`` on each, like the cases of
``corpus.py``, which this module extends (same sources, same helpers).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

from corpus import Q_PROJ, SINGLE, Case, edit_header, edit_json, resave

from loadstone import AdapterError, CheckpointError, ConfigError, EngineError, ResolutionError, WeightsMismatchError

CONFIG = "config.json"
ADAPTER = "adapter_config.json"


def _config(**values: Any) -> Callable[[Path], None]:
    return lambda root: edit_json(root / "model" / CONFIG, lambda c: c.update(values))


def _config_text(edit: Callable[[str], str]) -> Callable[[Path], None]:
    def damage(root: Path) -> None:
        path = root / "model" / CONFIG
        path.write_text(edit(path.read_text()))
    return damage


def _adapter(**values: Any) -> Callable[[Path], None]:
    return lambda root: edit_json(root / "adapter" / ADAPTER, lambda c: c.update(values))


def _adapter_text(edit: Callable[[str], str]) -> Callable[[Path], None]:
    def damage(root: Path) -> None:
        path = root / "adapter" / ADAPTER
        path.write_text(edit(path.read_text()))
    return damage


def _adapter_tensors(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    return lambda root: resave(root / "adapter" / "adapter_model.safetensors", edit)


def _duplicate_key(key: str, value: Any) -> Callable[[str], str]:
    return lambda text: text.rstrip()[:-1] + f", {json.dumps(key)}: {json.dumps(value)}}}"


def _nested(key: str, depth: int) -> Callable[[str], str]:
    return lambda text: text.rstrip()[:-1] + f", {json.dumps(key)}: " + "[" * depth + "]" * depth + "}"


def _replace_file_with_dir(*parts: str) -> Callable[[Path], None]:
    def damage(root: Path) -> None:
        path = root.joinpath(*parts)
        path.unlink()
        path.mkdir()
    return damage


def _replace_file_with_fifo(*parts: str) -> Callable[[Path], None]:
    def damage(root: Path) -> None:  # opening it to read would block forever
        path = root.joinpath(*parts)
        path.unlink()
        os.mkfifo(path)
    return damage


def _tensor_dtype(dtype_name: str) -> Callable[[Path], None]:
    def edit(tensors: dict) -> None:
        import torch

        tensors[Q_PROJ] = tensors[Q_PROJ].to(getattr(torch, dtype_name)) if dtype_name != "bool" else tensors[Q_PROJ] > 0
    return lambda root: resave(root / "model" / SINGLE, edit)


def _header_dtype(code: str, shape: list[int]) -> Callable[[Path], None]:
    """Relabel q_proj's bytes (16384 of them) as a dtype torch has no type for."""
    def edit(header: dict) -> None:
        header[Q_PROJ].update(dtype=code, shape=shape)
    return lambda root: edit_header(root / "model" / SINGLE, edit)


def _lora_keys(tensors: dict, module: str) -> list[str]:
    return sorted(k for k in tensors if f".{module}." in k)


def _extra_leaf(tensors: dict) -> None:
    key = _lora_keys(tensors, "q_proj")[0]
    tensors[key.replace("lora_A", "lora_C")] = tensors[key].clone()


def _drop_module(module: str) -> Callable[[dict], None]:
    def edit(tensors: dict) -> None:
        for key in _lora_keys(tensors, module):
            del tensors[key]
    return edit


def _to_bool(tensors: dict) -> None:
    key = _lora_keys(tensors, "q_proj")[0]
    tensors[key] = tensors[key] > 0


def _consolidated(root: Path) -> None:
    (root / "model" / SINGLE).rename(root / "model" / "consolidated.safetensors")


def _reference(reference: str, **kwargs: Any) -> Callable[[Path], dict]:
    return lambda root: {"reference": reference, "kwargs": kwargs}


R, A, C, W = ResolutionError, AdapterError, ConfigError, WeightsMismatchError
CASES: list[Case] = [
    # config.json: JSON that parses but is of the wrong shape or type
    Case("config_model_type_list", "single", _config(model_type=["llama"]), C,
         (CONFIG, "model_type", "['llama'] (list)")),
    Case("config_size_as_text", "single", _config(hidden_size="64"), C,
         (CONFIG, "hidden_size", "positive integer", "'64' (str)")),
    Case("config_size_zero", "single", _config(num_attention_heads=0), C, ("num_attention_heads", "0 (int)")),
    Case("config_size_negative", "single", _config(vocab_size=-1), C, ("vocab_size", "-1 (int)", "integer >= 1")),
    Case("config_size_overflows", "single", _config(hidden_size=2**62), C,
         (CONFIG, "cannot build", "overflow")),
    Case("config_nan", "single", _config_text(lambda t: t.replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": NaN')), C,
         (CONFIG, "not finite", "NaN")),
    Case("config_infinity_by_overflow", "single",
         _config_text(lambda t: t.replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": 1e999')), C,
         (CONFIG, "not finite", "1e999")),
    Case("config_duplicate_key", "single", _config_text(_duplicate_key("hidden_size", 32)), C,
         (CONFIG, "'hidden_size' twice", "each key once")),
    Case("config_nested_deeply", "single", _config_text(_nested("x", 100_000)), C,
         (CONFIG, "nested", "32 levels")),
    Case("config_quantization_config_text", "single", _config(quantization_config="nf4"), C,
         ("quantization_config", "'nf4' (str)")),
    Case("config_dtype_not_a_dtype", "single", _config(dtype="int8"), C,
         ("dtype", "floating dtype", "'int8'", "quantization_config")),
    Case("config_architectures_text", "single", _config(architectures="LlamaForCausalLM"), C,
         ("architectures", "a list of class names")),
    Case("config_value_transformers_refuses", "single", _config(rms_norm_eps="tiny"), C,
         (CONFIG, "field: rms_norm_eps", "expected float")),
    Case("config_is_a_directory", "single", _replace_file_with_dir("model", CONFIG), C,
         (CONFIG, "is a directory")),
    Case("config_is_a_fifo", "single", _replace_file_with_fifo("model", CONFIG), C,
         (CONFIG, "not a regular file")),
    Case("config_more_layers_than_the_weights", "single", _config(num_hidden_layers=10**7), W,
         (CONFIG, "10000000 layers", "num_hidden_layers", "at most 2")),
    # weights: dtypes that cannot fill their parameters, a weights file of another name
    Case("tensor_bool_for_a_float_weight", "single", _tensor_dtype("bool"), W,
         (SINGLE, Q_PROJ, "BOOL", "float tensor", "quantization_config")),
    Case("tensor_int64_for_a_float_weight", "single", _tensor_dtype("int64"), W, (Q_PROJ, "I64", "float tensor")),
    Case("tensor_int8_without_quantization_config", "single", _tensor_dtype("int8"), W,
         (Q_PROJ, "I8", "needs the quantization_config")),
    Case("tensor_dtype_torch_cannot_hold", "single", _header_dtype("F4", [64, 512]), W,
         (Q_PROJ, "F4, which this torch has no dtype for")),
    Case("consolidated_weights_for_transformers_engine", "single", _consolidated, EngineError,
         ("consolidated.safetensors", "from_pretrained reads model.safetensors"), {"engine": "transformers"}),
    Case("index_metadata_not_an_object_for_transformers_engine", "sharded",
         lambda root: edit_json(root / "model" / "model.safetensors.index.json", lambda d: d.update(metadata="x")),
         EngineError, ("\"metadata\" object", "model.safetensors.index.json"), {"engine": "transformers"}),
    Case("index_is_a_directory", "sharded", _replace_file_with_dir("model", "model.safetensors.index.json"),
         CheckpointError, ("model.safetensors.index.json", "is a directory")),
    # adapter_config.json
    Case("adapter_peft_type_list", "adapter", _adapter(peft_type=["LORA"]), A, (ADAPTER, "peft_type", "['LORA']")),
    Case("adapter_task_type_list", "adapter", _adapter(task_type=["CAUSAL_LM"]), A, (ADAPTER, "task_type", "list")),
    Case("adapter_rank_as_text", "adapter", _adapter(r="4"), A, (ADAPTER, "field: r", "an integer", "'4' (str)")),
    Case("adapter_rank_zero", "adapter", _adapter(r=0), A, ("field: r", "positive integer")),
    Case("adapter_alpha_nan", "adapter", _adapter_text(lambda t: t.replace('"lora_alpha": 8', '"lora_alpha": NaN')), A,
         (ADAPTER, "not finite")),
    Case("adapter_alpha_as_text", "adapter", _adapter(lora_alpha="16"), A, ("lora_alpha", "'16' (str)")),
    Case("adapter_alpha_negative", "adapter", _adapter(lora_alpha=-8), A, ("lora_alpha", "positive number")),
    Case("adapter_duplicate_key", "adapter", _adapter_text(_duplicate_key("r", 8)), A, (ADAPTER, "'r' twice")),
    Case("adapter_nested_deeply", "adapter", _adapter_text(_nested("x", 100_000)), A, (ADAPTER, "nested")),
    Case("adapter_rank_disagrees_with_tensors", "adapter", _adapter(r=8), A,
         (ADAPTER, "r=8", "rank 4", "field: r")),
    Case("adapter_targets_modules_without_tensors", "adapter", _adapter(target_modules=["q_proj", "v_proj", "k_proj"]),
         A, (ADAPTER, "target_modules", "no weights", "k_proj")),
    Case("adapter_tensors_of_untargeted_modules", "adapter", _adapter(target_modules=["q_proj"]), A,
         (ADAPTER, "target_modules", "does not target", "v_proj", "drop them")),
    Case("adapter_unknown_leaf", "adapter", _adapter_tensors(_extra_leaf), A,
         ("adapter_model.safetensors", "lora_C", "drop them")),
    Case("adapter_tensors_missing_for_a_target", "adapter", _adapter_tensors(_drop_module("v_proj")), A,
         (ADAPTER, "target_modules", "v_proj", "freshly initialised")),
    Case("adapter_tensor_not_floating", "adapter", _adapter_tensors(_to_bool), A,
         ("adapter_model.safetensors", "BOOL", "not floating point")),
    Case("adapter_regex_invalid", "adapter", _adapter(target_modules="(q_proj"), A,
         (ADAPTER, "target_modules", "not a valid regular expression")),
    Case("adapter_regex_nested_quantifiers", "adapter", _adapter(target_modules=r"(.*)*(.*)*(.*)*\.q_projX"), A,
         (ADAPTER, "target_modules", "unbounded time", "nests a repeat")),
    Case("adapter_regex_repeated_alternatives", "adapter", _adapter(target_modules=r"(q|q_)+proj"), A,
         ("target_modules", "repeats a group of alternatives")),
    Case("adapter_rank_pattern_regex_backreference", "adapter", _adapter(rank_pattern={r"(q)_\1": 4}), A,
         ("rank_pattern", "backreference")),
    Case("adapter_modules_to_save_pattern", "adapter", _adapter(modules_to_save=["lm_(head"]), A,
         ("modules_to_save", "module names")),
    Case("adapter_megatron", "adapter", _adapter(megatron_config={"a": 1}), A, ("megatron_config", "import")),
    Case("adapter_revision_object", "adapter", _adapter(revision={"branch": "main"}), A,
         (ADAPTER, "revision", "(dict)")),
    Case("adapter_base_is_a_list", "adapter", _adapter(base_model_name_or_path=["/x"]), A,
         (ADAPTER, "base_model_name_or_path", "(list)")),
    Case("adapter_base_home_of_no_user", "adapter", _adapter(base_model_name_or_path="~no_such_user_ls/x"), A,
         (ADAPTER, "base_model_name_or_path", "~no_such_user_ls/x", "cannot be expanded")),
    Case("adapter_base_not_a_hub_id", "adapter", _adapter(base_model_name_or_path="org/.."), A,
         (ADAPTER, "base_model_name_or_path", "nor a valid Hub id")),
    Case("adapter_base_name_too_long", "adapter", _adapter(base_model_name_or_path="org/" + "a" * 3000), A,
         (ADAPTER, "base_model_name_or_path", "nor a valid Hub id")),
    Case("adapter_prompt_learning_trainable", "adapter", lambda root: _prompt_adapter(root), A,
         (ADAPTER, "prompt-learning", "--frozen")),
    # references
    Case("reference_home_of_no_user", "single", _reference("~no_such_user_ls/model"), R, ("~no_such_user_ls", "~")),
    Case("reference_too_long_for_the_filesystem", "single", _reference("/" + "a" * 5000), R,
         ("cannot be used", "File name too long")),
    Case("reference_not_a_hub_id", "single", _reference("org/..", offline=True), R, ("nor a valid Hub id", "96")),
    Case("reference_revision_climbs", "single", _reference("org/name", revision="../../etc", offline=True), R,
         ("revision", "'..'")),
]


def _prompt_adapter(root: Path) -> None:
    """A real prompt-tuning adapter (peft loads those frozen only) in place of the LoRA one."""
    import torch
    from safetensors.torch import save_file

    config = json.loads((root / "adapter" / ADAPTER).read_text())
    shutil.rmtree(root / "adapter")
    (root / "adapter").mkdir()
    (root / "adapter" / ADAPTER).write_text(json.dumps({
        "peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 4, "token_dim": 64,
        "num_transformer_submodules": 1, "num_attention_heads": 4, "num_layers": 2,
        "base_model_name_or_path": config["base_model_name_or_path"]}))
    save_file({"prompt_embeddings": torch.zeros(4, 64)}, root / "adapter" / "adapter_model.safetensors")
