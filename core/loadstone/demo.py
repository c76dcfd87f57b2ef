"""``loadstone demo``: a tiny Llama and a LoRA adapter, loaded and trained for one step on the CPU."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any

DEMO_VERSION = "1"
DEMO_SHAPE = dict(vocab_size=2048, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512)


MARKER = ".loadstone-demo.json"
#: What a demo folder held before folders carried the marker (``save_pretrained`` of the base and
#: of the LoRA adapter); such a folder is recognised by this layout and the demo's model shape.
_LEGACY_ENTRIES = {"adapter", "base"}


def demo_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get("LOADSTONE_DEMO_DIR"):
        return Path(os.environ["LOADSTONE_DEMO_DIR"])
    return _default_dir()


def _default_dir() -> Path:
    import platformdirs

    return Path(platformdirs.user_cache_dir("loadstone")) / f"demo-v{DEMO_VERSION}"


def _marker_text() -> str:
    from . import __version__

    return json.dumps({"written_by": "loadstone demo", "demo_version": DEMO_VERSION, "loadstone_version": __version__,
                       "note": "loadstone deletes and rebuilds this folder when asked to (loadstone demo --rebuild)"},
                      indent=2) + "\n"


def _is_marked(root: Path) -> bool:
    try:
        return json.loads((root / MARKER).read_text()).get("written_by") == "loadstone demo"
    except (OSError, ValueError, AttributeError):
        return False


def _is_legacy_demo(root: Path, entries: list[Path]) -> bool:
    """A demo folder an older loadstone built, before the marker existed: nothing but ``adapter/``
    and ``base/``, the adapter pointing at ``../base`` and the base of the demo's own model shape.
    The layout alone is not enough: a user's own fine-tune is often saved just like that, and must
    never be taken for the demo and deleted."""
    if {e.name for e in entries} != _LEGACY_ENTRIES or any(e.is_symlink() or not e.is_dir() for e in entries):
        return False
    try:
        config = json.loads((root / "base" / "config.json").read_text())
        adapter = json.loads((root / "adapter" / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return False
    return (isinstance(config, dict) and isinstance(adapter, dict)
            and all(config.get(k) == v for k, v in DEMO_SHAPE.items())
            and adapter.get("base_model_name_or_path") == "../base")


def claim_demo_dir(cache_dir: str | os.PathLike | None = None, *, field: str = "--cache-dir") -> Path:
    """The demo folder, made loadstone's own (the marker written) before anything is built in it.

    loadstone only ever deletes a folder it wrote: one carrying the marker, or an older demo folder
    (:func:`_is_legacy_demo`), or the default folder under loadstone's user cache, which loadstone
    named. A new or empty folder is claimed. Anything else (a folder holding other files, a file,
    the empty path, which would mean the current folder) is an :class:`OptionError`, raised before
    the build starts."""
    from .contract.errors import OptionError

    fix = "pick an empty or new folder, e.g. --cache-dir /tmp/loadstone-demo (or leave the option out)"
    if cache_dir is not None and not str(cache_dir).strip():
        raise OptionError("the demo folder is an empty path, which would mean the current folder.", field=field,
                          found=repr(str(cache_dir)), expected="the path of an empty or new folder", fix=fix)
    root = Path(os.path.abspath(Path(demo_dir(cache_dir)).expanduser()))
    try:
        if root.exists() and not root.is_dir():
            raise OptionError("the demo folder's path names something that is not a folder.", file=root,
                              field=field, found=str(root), expected="an empty or new folder", fix=fix)
        if root.is_dir() and not _is_marked(root):
            entries = list(root.iterdir())
            ours = not entries or _is_legacy_demo(root, entries) or (cache_dir is None and root == _default_dir())
            if not ours:
                shown = ", ".join(sorted(e.name for e in entries)[:5]) + (", ..." if len(entries) > 5 else "")
                raise OptionError(
                    "the demo folder already holds files loadstone did not write; the demo replaces its folder's "
                    "contents, so it will not use this one.", file=root, field=field,
                    found=f"{root} (holding {shown})", expected=f"an empty or new folder, or one holding {MARKER}",
                    fix=fix)
        root.mkdir(parents=True, exist_ok=True)
        if not _is_marked(root):
            (root / MARKER).write_text(_marker_text())
    except OSError as exc:
        raise OptionError(f"the demo folder cannot be created or written: {exc.strerror or exc}.", file=root,
                          field=field, found=str(root), expected="a folder this user can write", fix=fix) from None
    return root


def _complete(root: Path) -> bool:
    return (root / "adapter" / "adapter_config.json").is_file() and (root / "base" / "config.json").is_file()


def build_demo_checkpoint(root: Path, *, rebuild: bool = False) -> Path:
    """Write ``root/base`` (random Llama, bf16 safetensors) and ``root/adapter`` (LoRA on it).

    ``root`` is claimed first (:func:`claim_demo_dir`), so a folder loadstone did not write is
    refused, never emptied. Built in a temporary folder inside ``root`` and moved into place,
    the adapter last: an interrupted build leaves no adapter, and the next run builds again.
    """
    root = claim_demo_dir(root)
    if not rebuild and _complete(root):
        return root / "adapter"
    from transformers.utils import logging as hf_logging

    from .termination import signals_unwind_the_load

    hf_logging.disable_progress_bar()
    # SIGTERM (docker, timeout) unwinds the build like Ctrl-C does, so the temporary folder goes too.
    with signals_unwind_the_load():
        return _build(root, Path(tempfile.mkdtemp(prefix=".building-", dir=root)))


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
        _install(root, tmp)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root / "adapter"


def _install(root: Path, tmp: Path) -> None:
    """Replace what a claimed ``root`` holds with the ``base`` and ``adapter`` built in ``tmp``.

    The folder itself stays (it may be the current folder, or one the user made for the demo);
    only its contents go, and :func:`claim_demo_dir` checked they are loadstone's. Refuses, rather
    than empties, a folder that lost its marker since."""
    if not _is_marked(root):
        from .contract.errors import OptionError

        raise OptionError("the demo folder no longer carries loadstone's marker; it is left as it is.", file=root,
                          field="--cache-dir", found=str(root), expected=f"a folder holding {MARKER}",
                          fix="pick an empty or new folder")
    for entry in root.iterdir():
        if entry.name == MARKER or entry == tmp:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    os.replace(tmp / "base", root / "base")
    os.replace(tmp / "adapter", root / "adapter")  # last: the folder counts as complete from here


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
             as_json: bool = False, progress: bool | None = None, library_stdout: IO[str] | None = None) -> int:
    """``library_stdout``: where what libraries print while the demo is built and loaded goes (the
    CLI keeps it off stdout, which carries the report alone); ``None`` leaves it on stdout."""
    import loadstone
    from loadstone import ComponentNotFoundError

    field = "--cache-dir" if cache_dir is not None else (
        "LOADSTONE_DEMO_DIR" if os.environ.get("LOADSTONE_DEMO_DIR") else "demo folder")
    root = claim_demo_dir(cache_dir, field=field)  # refused here, before the build's seconds
    with contextlib.redirect_stdout(library_stdout) if library_stdout is not None else contextlib.nullcontext():
        adapter = build_demo_checkpoint(root, rebuild=rebuild)
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
