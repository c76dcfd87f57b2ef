"""Helpers for tests and examples with tiny random checkpoints.

gptqmodel loads a model together with its tokenizer, and the random checkpoints of
:func:`loadstone.testing.make_checkpoint` have none. :func:`save_word_tokenizer` writes a real one
(a ``tokenizers`` word-level model trained on the given texts) into such a folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

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
