"""instanttensor's ring on a real GPU, where it differs from the 1 GiB default: a checkpoint whose
largest tensor is bigger (the ring grows to it: the plan must count that), and a GPU nearly full
(instanttensor's own rule, a ring within half the free memory, must not refuse a plan that fits).
The plans are tested on any machine in tests/test_instant_ring.py; CI has no GPU, these run on the
lent GPU machine:

    python3 -m pytest tests/test_gpu_instant_ring.py
"""

import sys
import threading
import warnings
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

GiB, MiB = 1 << 30, 1 << 20
VOCAB, WIDTH = 72000, 4096  # a float32 embedding of 1.10 GiB: bigger than the 1 GiB ring


def _save(folder: Path, **config) -> str:
    pytest.importorskip("instanttensor")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device("cuda:0"):
        model = LlamaForCausalLM(LlamaConfig(**config, dtype="float32")).float()
    model.save_pretrained(folder, max_shard_size="2GB")
    del model
    gpu_free_after_cleanup()
    return str(folder)


@pytest.fixture(scope="module")
def wide_vocabulary(tmp_path_factory) -> str:
    return _save(tmp_path_factory.mktemp("wide") / "checkpoint", vocab_size=VOCAB, hidden_size=WIDTH,
                 intermediate_size=256, num_hidden_layers=1, num_attention_heads=32, num_key_value_heads=8,
                 tie_word_embeddings=True)


@pytest.fixture(scope="module")
def float32_llama(tmp_path_factory) -> str:
    """1.21 GiB stored in float32 (so the ring is not trimmed below 1 GiB), 0.61 GiB on the device
    in bf16: smaller than the ring."""
    return _save(tmp_path_factory.mktemp("fp32") / "checkpoint", vocab_size=4096, hidden_size=2048,
                 intermediate_size=5632, num_hidden_layers=6, num_attention_heads=16, num_key_value_heads=16)


class _DevicePeak:
    """The most device memory in use (all of it, instanttensor's ring included), sampled every
    millisecond while the block runs."""

    def __enter__(self):
        self.peak, self.done = 0, threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def _watch(self):
        while not self.done.is_set():
            free, total = torch.cuda.mem_get_info(0)
            self.peak = max(self.peak, total - free)
            self.done.wait(0.001)

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()


@pytest.mark.parametrize("read_ahead", ["off", "auto"])
def test_a_tensor_bigger_than_the_ring_is_counted_in_the_plan_and_loads_as_stored(wide_vocabulary, read_ahead):
    largest = VOCAB * WIDTH * 4
    used_before = torch.cuda.mem_get_info(0)[1] - gpu_free_after_cleanup()
    with warnings.catch_warnings(record=True) as caught, _DevicePeak() as device:
        warnings.simplefilter("always")
        loaded = loadstone.load(wide_vocabulary, placement="cuda:0", dtype="float32", progress=False,
                                trainable=False, engine_options={"reader": "instanttensor", "read_ahead": read_ahead})
    assert not [w for w in caught if "buffer size" in str(w.message)], [str(w.message) for w in caught]
    ring = loaded.report.engine["extra_bytes"]["cuda:0"]
    assert ring >= largest
    added = device.peak - used_before
    assert added <= loaded.plan.peak_bytes_per_device["cuda:0"] + 128 * MiB, (added, loaded.plan.peak_bytes_per_device)
    reference = loadstone.load(wide_vocabulary, placement="cuda:0", dtype="float32", engine="transformers",
                               progress=False, trainable=False)
    assert_same_weights(loaded.model, reference.model)


def test_a_nearly_full_gpu_loads_a_plan_that_fits(float32_llama):
    """The GPU filled until the plan's peak and 128 MiB are left: instanttensor by itself would keep
    its 1 GiB ring within half of that and refuse (checked first, so the test shows the case); the
    load, which counted the ring in its plan, goes through and reads the same weights."""
    from instanttensor import safe_open
    from instanttensor._impl import BackendPolicy

    options = {"reader": "instanttensor", "read_ahead": "off"}
    plan = loadstone.plan(float32_llama, placement="cuda:0", dtype="bfloat16", engine="loadstone", engine_options=options)
    peak = plan.peak_bytes_per_device["cuda:0"]
    left = peak + 128 * MiB
    assert left / 2 < GiB  # instanttensor's own budget, half the free memory, is smaller than its ring
    files = sorted(str(p) for p in Path(float32_llama).glob("*.safetensors"))
    hog = torch.empty(gpu_free_after_cleanup() - left, dtype=torch.uint8, device="cuda:0")
    try:
        with pytest.raises(RuntimeError, match="exceeds device memory budget"):
            safe_open(files, framework="pt", device="cuda:0", backend=BackendPolicy.BUFFERED, buffer_size=GiB)
        loaded = loadstone.load(float32_llama, placement="cuda:0", dtype="bfloat16", progress=False, trainable=False,
                                engine="loadstone", engine_options=options)
        assert loaded.plan.engine_options["reader"] == "instanttensor"
        model = loaded.model.cpu()
        del loaded
    finally:
        del hog
        torch.cuda.empty_cache()  # back to CUDA: the next test's plan counts free device memory
    reference = loadstone.load(float32_llama, placement="cpu", dtype="bfloat16", engine="transformers",
                               progress=False, trainable=False)
    assert_same_weights(model, reference.model)


@pytest.mark.parametrize("read_ahead", ["off", "auto"])
def test_a_ring_outside_torch_gets_the_memory_torch_holds_cached(float32_llama, read_ahead):
    """A process that freed a model keeps its memory in torch's cache: the plan counts it as free
    (as transformers does), and instanttensor, which allocates its ring with CUDA directly, gets
    it back from torch before it opens. Only 512 MiB is free for CUDA here, less than the ring."""
    options = {"reader": "instanttensor", "read_ahead": read_ahead}
    hog = torch.empty(gpu_free_after_cleanup() - 512 * MiB, dtype=torch.uint8, device="cuda:0")
    del hog  # cached by torch, not free for CUDA
    try:
        assert torch.cuda.mem_get_info(0)[0] < GiB
        loaded = loadstone.load(float32_llama, placement="cuda:0", dtype="bfloat16", progress=False, trainable=False,
                                engine="loadstone", engine_options=options)
        assert loaded.plan.engine_options["reader"] == "instanttensor"
        assert ("read_ahead" in loaded.report.engine) == (read_ahead == "auto")
        model = loaded.model.cpu()
        del loaded
    finally:
        torch.cuda.empty_cache()
    reference = loadstone.load(float32_llama, placement="cpu", dtype="bfloat16", engine="transformers",
                               progress=False, trainable=False)
    assert_same_weights(model, reference.model)
