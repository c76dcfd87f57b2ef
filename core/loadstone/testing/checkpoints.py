"""Tiny real checkpoints: every builder writes a real ``save_pretrained`` folder with random
weights for a real transformers architecture; nothing is downloaded.

>>> from loadstone.testing import make_checkpoint
>>> folder = make_checkpoint("llama", tmp_path / "llama")       # doctest: +SKIP
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Small enough to build in well under a second, big enough for bitsandbytes (dims % 64 == 0).
_COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=320, max_position_embeddings=128)

ARCHITECTURES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", dict(_COMMON, tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", dict(_COMMON, tie_word_embeddings=False)),
    "mistral": ("MistralConfig", dict(_COMMON, tie_word_embeddings=False, sliding_window=None)),
    "gemma": ("GemmaConfig", dict(_COMMON, head_dim=16)),
    "gpt2": ("GPT2Config", dict(n_embd=64, n_layer=2, n_head=4, vocab_size=320, n_positions=128, bos_token_id=0, eos_token_id=0,
                                tie_word_embeddings=True)),
    "mixtral": ("MixtralConfig", dict(_COMMON, num_local_experts=4, num_experts_per_tok=2,
                                      tie_word_embeddings=False)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(_COMMON, num_experts=4, num_experts_per_tok=2,
                                         moe_intermediate_size=64, shared_expert_intermediate_size=64,
                                         tie_word_embeddings=False)),
}

LORA_TARGETS = {
    "gpt2": ["c_attn", "c_proj"],
}


def make_config(arch: str, **overrides: Any) -> Any:
    import transformers

    cls_name, kwargs = ARCHITECTURES[arch]
    return getattr(transformers, cls_name)(**{**kwargs, **overrides})


def make_checkpoint(arch: str, folder: str | Path, *, dtype: str = "float32", seed: int = 0,
                    max_shard_size: str | int | None = None, task: str = "causal-lm",
                    **overrides: Any) -> Path:
    """Save a random model of architecture ``arch`` to ``folder`` and return the folder.

    ``max_shard_size`` (e.g. ``"200KB"``) writes a sharded checkpoint with an index.
    """
    import torch
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    folder = Path(folder)
    torch.manual_seed(seed)
    config = make_config(arch, **overrides)
    auto = transformers.AutoModelForCausalLM if task == "causal-lm" else transformers.AutoModelForSequenceClassification
    if task != "causal-lm":
        config.num_labels = 3
        config.pad_token_id = 0
    model = auto.from_config(config, dtype=getattr(torch, dtype))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    return folder


def make_lora_adapter(base_folder: str | Path, folder: str | Path, *, arch: str = "llama", r: int = 4,
                      target_modules: list[str] | None = None, base_reference: str | None = None,
                      task_type: str = "CAUSAL_LM", seed: int = 1) -> Path:
    """Train-free LoRA adapter for the model in ``base_folder`` (B initialised non-zero).

    ``base_reference`` is written as ``base_model_name_or_path`` (default: the absolute base path).
    """
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.manual_seed(seed)
    auto = transformers.AutoModelForCausalLM if task_type == "CAUSAL_LM" else transformers.AutoModelForSequenceClassification
    model = auto.from_pretrained(str(base_folder))
    targets = target_modules or LORA_TARGETS.get(arch, ["q_proj", "v_proj"])
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets,
                                                  task_type=task_type, lora_dropout=0.0))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    folder = Path(folder)
    peft_model.save_pretrained(folder)
    cfg_path = folder / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = base_reference if base_reference is not None else str(Path(base_folder).resolve())
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return folder


def make_hub_cache(cache_dir: str | Path, repo_id: str, source_folder: str | Path, *,
                   commit: str = "0123456789abcdef0123456789abcdef01234567", ref: str = "main") -> Path:
    """Lay out ``source_folder`` as huggingface_hub's cache does (``models--org--name/snapshots/<commit>``,
    ``refs/<ref>``, blobs), so offline resolution can be tested without a network."""
    import hashlib
    import os
    import shutil

    repo_dir = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / commit
    blobs = repo_dir / "blobs"
    snapshot.mkdir(parents=True, exist_ok=True)
    blobs.mkdir(parents=True, exist_ok=True)
    for path in sorted(Path(source_folder).iterdir()):
        if not path.is_file():
            continue
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        blob = blobs / digest
        if not blob.exists():
            shutil.copyfile(path, blob)
        link = snapshot / path.name
        if link.exists() or link.is_symlink():
            link.unlink()
        os.symlink(os.path.relpath(blob, snapshot), link)
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / ref).write_text(commit)
    return snapshot


def main(argv: list[str] | None = None) -> int:
    """``python -m loadstone.testing``: the builders above from a shell (docs examples, bug reports)."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m loadstone.testing",
        description="Write tiny random checkpoints and LoRA adapters to try loadstone or test plugins.",
        epilog="examples:\n  python -m loadstone.testing checkpoint llama ./tiny-llama\n"
               "  python -m loadstone.testing adapter ./tiny-llama ./tiny-lora",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True, metavar="WHAT")
    p = sub.add_parser("checkpoint", help="a random model of a real architecture, saved with save_pretrained")
    p.add_argument("arch", choices=sorted(ARCHITECTURES))
    p.add_argument("folder")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--max-shard-size", metavar="SIZE", help="write shards and an index, e.g. 200KB")
    p = sub.add_parser("adapter", help="a LoRA adapter for a checkpoint folder")
    p.add_argument("base", help="the checkpoint folder the adapter is for")
    p.add_argument("folder")
    p.add_argument("--arch", default="llama", help="picks the target modules (gpt2: c_attn, c_proj)")
    p.add_argument("-r", type=int, default=4, help="LoRA rank")
    p.add_argument("--base-reference", metavar="REF",
                   help="written as base_model_name_or_path (default: the base's absolute path)")
    args = parser.parse_args(argv)
    import contextlib
    import sys

    from ..quiet import library_output

    # stdout carries the folder alone (`$(python -m loadstone.testing ...)` in a shell): what the
    # libraries print while building (gptqmodel's banner, when peft imports it) goes to stderr,
    # and their warnings are silenced as the CLI silences them
    with library_output(verbose=False), contextlib.redirect_stdout(sys.stderr):
        if args.what == "checkpoint":
            folder = make_checkpoint(args.arch, args.folder, dtype=args.dtype, max_shard_size=args.max_shard_size)
        else:
            folder = make_lora_adapter(args.base, args.folder, arch=args.arch, r=args.r,
                                       base_reference=args.base_reference)
    print(folder)
    return 0
