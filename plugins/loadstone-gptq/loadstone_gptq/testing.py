"""Helpers for tests and examples with tiny random checkpoints.

gptqmodel loads a model together with its tokenizer, and the random checkpoints of
:func:`loadstone.testing.make_checkpoint` have none. :func:`save_word_tokenizer` writes a real one
(a ``tokenizers`` word-level model trained on the given texts) into such a folder, and
:func:`make_gptq_checkpoint` goes all the way: a tiny random model, quantized by gptqmodel.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

SPECIAL = ("<unk>", "<s>", "</s>")


def save_word_tokenizer(folder: str | Path, texts: Iterable[str], *, vocab_size: int = 256) -> Path:
    """Train a word-level tokenizer on ``texts`` and save it into ``folder`` (``tokenizer.json`` and
    ``tokenizer_config.json``). ``vocab_size`` must not exceed the model's vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token=SPECIAL[0]))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(list(texts), trainers.WordLevelTrainer(special_tokens=list(SPECIAL),
                                                                         vocab_size=vocab_size))
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token=SPECIAL[0], bos_token=SPECIAL[1],
                                      eos_token=SPECIAL[2], pad_token=SPECIAL[2])
    wrapped.save_pretrained(str(folder))
    return Path(folder)


SAMPLE_TEXTS = tuple(f"sample {i}: the quick brown fox jumps over the lazy dog and runs home" for i in range(16))


def make_gptq_checkpoint(folder: str | Path, *, arch: str = "llama", dtype: str = "bfloat16", bits: int = 4,
                         group_size: int = 32, **quantize_options: Any) -> Path:
    """A tiny random ``arch`` model (:func:`loadstone.testing.make_checkpoint`) with a word-level
    tokenizer, quantized to GPTQ by gptqmodel into ``folder`` (a second folder, ``folder`` +
    ``-source``, keeps the unquantized model). Takes a second or two on a CPU.
    ``quantize_options`` go to :func:`loadstone_gptq.quantize` (``desc_act``, ``sym`` ...)."""
    from loadstone.testing import make_checkpoint

    from .quantize import quantize

    folder = Path(folder)
    source = make_checkpoint(arch, folder.with_name(folder.name + "-source"), dtype=dtype)
    save_word_tokenizer(source, SAMPLE_TEXTS)
    quantize_options.setdefault("progress", False)
    return quantize(source, folder, list(SAMPLE_TEXTS), bits=bits, group_size=group_size, **quantize_options)
