"""instanttensor reading past the page cache (engine option ``io``; docs/user-guide.md, "A cold
checkpoint: direct reads"). CI has no GPU; these run on the lent GPU machine:

    python3 -m pytest tests/test_gpu_direct_io.py

The checkpoint lies on a file system that takes O_DIRECT (not tmpfs: ``disk_folder``), so that a
direct read is a real one, and is evicted from the page cache with ``posix_fadvise`` to be cold.
"""

import os
import sys
from pathlib import Path

import pytest
import torch

import loadstone

sys.path.insert(0, str(Path(__file__).parent))  # tests/ is not a package (--import-mode=importlib)
from conftest import assert_same_weights  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (CI has none)"),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="O_DIRECT and posix_fadvise are Linux's"),
]


@pytest.fixture
def llama_on_disk(disk_folder):
    pytest.importorskip("instanttensor")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                         num_attention_heads=16, num_key_value_heads=8, dtype="bfloat16")
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(disk_folder, max_shard_size="100MB")
    return str(disk_folder)


def _evict(folder: str) -> None:
    """Drop the folder's pages from the page cache (written back first: dirty pages stay)."""
    for name in os.listdir(folder):
        fd = os.open(os.path.join(folder, name), os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _load(folder: str, **options):
    return loadstone.load(folder, placement="cuda:0", progress=False, trainable=False, engine_options=options)


def test_a_cold_checkpoint_is_read_directly_and_gives_the_same_model(llama_on_disk):
    from loadstone.engines.page_cache import cached_fraction

    _evict(llama_on_disk)
    files = [os.path.join(llama_on_disk, f) for f in os.listdir(llama_on_disk) if f.endswith(".safetensors")]
    assert cached_fraction(files) < 0.5
    cold = _load(llama_on_disk)
    assert cold.plan.engine_options["io"] == "direct", cold.report.notes
    assert "read_ahead" not in cold.report.engine  # cold: read after the plan, not ahead
    assert any("direct reads past the page cache (io=auto found the checkpoint out of the page cache)" in note
               for note in cold.report.notes), cold.report.notes
    assert not any("was refused" in note for note in cold.report.notes), cold.report.notes
    assert cached_fraction(files) < 0.5  # past the page cache: it holds no more than before
    reference = loadstone.load(llama_on_disk, placement="cuda:0", engine="transformers", progress=False,
                               trainable=False)
    assert_same_weights(cold.model, reference.model)
    warm = _load(llama_on_disk, read_ahead="off")  # the reference read the files into the page cache
    assert warm.plan.engine_options["io"] == "buffered"
    assert_same_weights(warm.model, reference.model)


def test_direct_reads_on_a_warm_checkpoint_when_asked(llama_on_disk, recwarn):
    asked = _load(llama_on_disk, io="direct")
    plain = _load(llama_on_disk, io="buffered", read_ahead="off")
    # the checkpoint is smaller than the 1 GiB ring: instanttensor trims it, and that is not the user's business
    assert not [w for w in recwarn if "buffer size" in str(w.message)], [str(w.message) for w in recwarn]
    assert asked.plan.engine_options["io"] == "direct" and plain.plan.engine_options["io"] == "buffered"
    assert_same_weights(asked.model, plain.model)


def test_a_refused_direct_read_falls_back_to_the_page_cache_and_says_so(llama_on_disk, monkeypatch):
    """Forced: instanttensor refusing O_DIRECT (as a file system without it would)."""
    from loadstone.engines import instant

    opened = instant._open

    def refusing(*args, direct=False, **kwargs):
        if direct:
            raise OSError(22, "Invalid argument (O_DIRECT)")
        return opened(*args, **kwargs)

    monkeypatch.setattr(instant, "_open", refusing)
    loaded = _load(llama_on_disk, io="direct")
    notes = [n for n in loaded.report.notes if "was refused" in n]
    assert notes and "O_DIRECT" in notes[0] and "through the page cache" in notes[0]
    monkeypatch.undo()
    assert_same_weights(loaded.model, _load(llama_on_disk, io="buffered", read_ahead="off").model)
