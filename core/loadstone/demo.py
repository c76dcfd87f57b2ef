"""``loadstone demo``: a tiny Llama and a LoRA adapter, loaded and trained for one step on the CPU."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

DEMO_VERSION = "1"
DEMO_SHAPE = dict(vocab_size=2048, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512)


def demo_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get("LOADSTONE_DEMO_DIR"):
        return Path(os.environ["LOADSTONE_DEMO_DIR"])
    import platformdirs

    return Path(platformdirs.user_cache_dir("loadstone")) / f"demo-v{DEMO_VERSION}"


def build_demo_checkpoint(root: Path) -> Path:
    """Write ``root/base`` (random Llama, bf16 safetensors) and ``root/adapter`` (LoRA on it).

    Built in a temporary sibling folder and renamed into place, so an interrupted build leaves
    nothing half-written behind.
    """
    if (root / "adapter" / "adapter_config.json").is_file() and (root / "base" / "config.json").is_file():
        return root / "adapter"
    from transformers.utils import logging as hf_logging

    from .termination import signals_unwind_the_load

    hf_logging.disable_progress_bar()
    root.parent.mkdir(parents=True, exist_ok=True)
    # SIGTERM (docker, timeout) unwinds the build like Ctrl-C does, so the temporary folder goes too.
    with signals_unwind_the_load():
        return _build(root, Path(tempfile.mkdtemp(prefix=".building-", dir=root.parent)))


def _build(root: Path, tmp: Path) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    try:
        torch.manual_seed(0)
        config = LlamaConfig(**DEMO_SHAPE, dtype="bfloat16", tie_word_embeddings=False)
        model = LlamaForCausalLM(config).to(torch.bfloat16)
        model.save_pretrained(tmp / "base")
        lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                          task_type="CAUSAL_LM", lora_dropout=0.0)
        peft_model = get_peft_model(model, lora)
        with torch.no_grad():  # a trained-looking adapter: B is zero right after init
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.02)
        peft_model.save_pretrained(tmp / "adapter")
        cfg_path = tmp / "adapter" / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["base_model_name_or_path"] = "../base"  # relative: resolved against the adapter folder
        cfg_path.write_text(json.dumps(cfg, indent=2))
        if root.exists():
            shutil.rmtree(root)
        os.replace(tmp, root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root / "adapter"


def one_training_step(model: Any) -> dict[str, Any]:
    """Forward + backward on random tokens; report which parameters received gradients."""
    import torch

    torch.manual_seed(1)
    vocab = model.config.vocab_size if hasattr(model, "config") else DEMO_SHAPE["vocab_size"]
    device = next(p.device for p in model.parameters() if p.device.type != "meta")
    ids = torch.randint(0, vocab, (2, 32)).to(device)
    model.train()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    with_grad = [n for n, p in model.named_parameters() if p.grad is not None]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    base_with_grad = [n for n in with_grad if "lora_" not in n]
    return {"loss": float(out.loss.detach()), "parameters_with_gradients": len(with_grad),
            "trainable_parameters": len(trainable), "all_gradients_on_adapter": not base_with_grad and bool(with_grad),
            "base_parameters_with_gradients": base_with_grad[:5]}


def run_demo(*, cache_dir: str | None = None, rebuild: bool = False, quantize: bool = True,
             as_json: bool = False, progress: bool | None = None) -> int:
    import loadstone
    from loadstone import ComponentNotFoundError

    root = demo_dir(cache_dir)
    if rebuild and root.exists():
        shutil.rmtree(root)
    adapter = build_demo_checkpoint(root)
    quantization = "none"
    if quantize:
        try:
            reg = loadstone.get_plugin_manager().quantization_backend("nf4")
            if not reg.component.environment_problems():
                quantization = "nf4"
        except ComponentNotFoundError:
            pass
    result = loadstone.load(str(adapter), quantization=quantization, placement="cpu", progress=progress)
    step = one_training_step(result.model)
    if as_json:
        print(json.dumps({"report": result.report.to_dict(), "training_step": step}, indent=2, default=str))
    else:
        print(result.report.render())
        print()
        print("one training step")
        print("=================")
        print(f"loss {step['loss']:.4f}; {step['parameters_with_gradients']} parameter tensors received gradients, "
              f"all of them adapter (LoRA) weights: {'yes' if step['all_gradients_on_adapter'] else 'NO'}")
        if quantization == "none" and quantize:
            print("(install plugins/loadstone-bnb to see the same load quantized to NF4)")
    return 0 if step["all_gradients_on_adapter"] else 1
