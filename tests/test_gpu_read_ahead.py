"""The native engine reading ahead with instanttensor onto a CUDA device (docs/user-guide.md,
"Reading ahead while the plan is made"). CI has no GPU; these run on the lent GPU machine:

    python3 -m pytest tests/test_gpu_read_ahead.py

The checkpoint is 1.1 GB, so that the ring (at least 1 GiB) is memory a test can see come back.
"""

import sys
from pathlib import Path

import pytest
import torch

import loadstone

sys.path.insert(0, str(Path(__file__).parent))  # tests/ is not a package (--import-mode=importlib)
from conftest import assert_same_weights, gpu_free_after_cleanup  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (CI has none)"),
]

GiB = 1 << 30


@pytest.fixture(scope="module")
def gigabyte_llama(tmp_path_factory):
    pytest.importorskip("instanttensor")
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("gigabyte-llama")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=8,
                         num_attention_heads=16, num_key_value_heads=16, dtype="bfloat16")
    with torch.device("cuda:0"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder, max_shard_size="400MB")
    del model
    torch.cuda.empty_cache()
    return str(folder)


def test_reading_ahead_gives_the_same_model_and_gives_its_ring_back(gigabyte_llama):
    free_before = gpu_free_after_cleanup()
    ahead = loadstone.load(gigabyte_llama, placement="cuda:0", progress=False, trainable=False)
    ring = ahead.report.engine["read_ahead"]["cuda:0"]
    assert ring >= GiB and ahead.report.engine["extra_bytes"] == {"cuda:0": ring}
    assert ahead.plan.read_ahead is None and ahead.plan.engine_options["reader"] == "instanttensor"
    assert any("while the plan was made" in note for note in ahead.report.notes), ahead.report.notes
    after_plain = loadstone.load(gigabyte_llama, placement="cuda:0", engine_options={"read_ahead": "off"},
                                 progress=False, trainable=False)
    assert "read_ahead" not in after_plain.report.engine
    reference = loadstone.load(gigabyte_llama, placement="cuda:0", engine="transformers", progress=False,
                               trainable=False)
    assert_same_weights(ahead.model, reference.model)
    assert_same_weights(after_plain.model, reference.model)
    del ahead, after_plain, reference
    assert gpu_free_after_cleanup() > free_before - 256 * (1 << 20)  # no ring left behind


def test_an_asked_ring_size_is_the_one_used(gigabyte_llama):
    loaded = loadstone.load(gigabyte_llama, placement="cuda:0", engine_options={"read_ahead": "1GiB"},
                            progress=False, trainable=False)
    assert loaded.report.engine["read_ahead"] == {"cuda:0": GiB}


def test_a_ring_that_does_not_fit_the_budget_is_not_read_into_and_the_plan_reads_after(gigabyte_llama):
    """A budget of 1.5 GiB holds the model (1.0 GiB) but not a ring beside it: the engine reads
    nothing ahead (the ring is sized within max_memory) and reads with pread, the same model."""
    free_before = gpu_free_after_cleanup()
    loaded = loadstone.load(gigabyte_llama, placement="cuda:0", max_memory={0: "1.5GiB", "cpu": "64GiB"},
                            progress=False, trainable=False)
    assert loaded.plan.engine_options["reader"] == "pread" and "read_ahead" not in loaded.report.engine
    reference = loadstone.load(gigabyte_llama, placement="cuda:0", engine="transformers", progress=False,
                               trainable=False)
    assert_same_weights(loaded.model, reference.model)
    del loaded, reference
    assert gpu_free_after_cleanup() > free_before - 256 * (1 << 20)


def test_a_plan_that_fails_after_reading_ahead_gives_the_ring_back(gigabyte_llama):
    free_before = gpu_free_after_cleanup()
    with pytest.raises(loadstone.PlacementError, match="does not fit"):
        loadstone.load(gigabyte_llama, placement="cuda:0", max_memory={0: "512MiB", "cpu": "64GiB"},
                       progress=False)
    assert gpu_free_after_cleanup() > free_before - 256 * (1 << 20)


def test_nf4_reads_ahead_only_when_asked_and_equals_reading_after(gigabyte_llama):
    """A quantizing load does not read ahead by itself (its ring would outweigh the model it
    speeds up); asked for a ring size, it does, and the weights are the same."""
    pytest.importorskip("bitsandbytes")
    from loadstone.testing import plugins_with

    plugins = plugins_with("nf4", "loadstone_bnb.plugin", "bnb")
    ahead = loadstone.load(gigabyte_llama, placement="cuda:0", quantization="nf4", plugins=plugins, progress=False,
                           trainable=False, engine_options={"read_ahead": "1GiB"})
    after = loadstone.load(gigabyte_llama, placement="cuda:0", quantization="nf4", plugins=plugins, progress=False,
                           trainable=False)
    assert ahead.report.engine["read_ahead"] == {"cuda:0": GiB} and "read_ahead" not in after.report.engine
    assert_same_weights(ahead.model, after.model)
