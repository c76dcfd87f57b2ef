"""Reading safetensors without a memory map: :class:`~loadstone.SafetensorsReader` (big tensors in
parallel parts, page-locked memory for GPU-bound tensors, a forked child's own read pool) and the
transformers engine's file handles, which give ``from_pretrained`` its tensors through it. Every
path is forced on any machine: pinned allocations are recorded, the split threshold lowered. The
GPU side (real pinned blocks) is tests/test_gpu.py."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import pytest
import torch

import loadstone


def test_the_transformers_engines_file_handles_read_whole_tensors_and_delegate_parts(tiny_checkpoint):
    """What from_pretrained gets from safe_open during the engine's load: keys, shapes and dtypes
    from safetensors, whole tensors from loadstone's reader, parts (tensor-parallel shards) from
    safetensors' pread backend; all equal to safetensors' own reads."""
    import transformers.modeling_utils as modeling_utils
    from safetensors.torch import load_file

    from loadstone.engines.transformers import safetensors_read_not_mapped

    folder = tiny_checkpoint("llama", max_shard_size="200KB")
    plan = loadstone.plan(str(folder), placement="cpu")
    original = modeling_utils.safe_open
    files = sorted(folder.glob("*.safetensors"))
    assert len(files) > 1
    with safetensors_read_not_mapped(plan.inventory):
        for path in files:
            expected = load_file(str(path))
            with modeling_utils.safe_open(str(path), framework="pt", device="cpu") as handle:
                assert sorted(handle.keys()) == sorted(expected)
                for name, tensor in expected.items():
                    part = handle.get_slice(name)
                    assert list(part.get_shape()) == list(tensor.shape)
                    assert part.get_dtype() == plan.inventory.tensors[name].dtype
                    assert torch.equal(part[...], tensor) and torch.equal(handle.get_tensor(name), tensor)
                    if tensor.ndim:
                        assert torch.equal(part[0:1], tensor[0:1])
    assert modeling_utils.safe_open is original


def test_the_transformers_engine_reads_tensors_bound_for_a_gpu_into_pinned_memory(tiny_checkpoint, monkeypatch):
    """Whole tensors the plan's device map puts on a CUDA device are asked for in page-locked
    memory where at least PINNED_REUSE of them share a block size (forced here on any machine: the
    allocation is recorded and served with plain memory), the others in plain memory; the same
    bytes either way, and the pinned blocks are given back when the load's reading ends."""
    import transformers.modeling_utils as modeling_utils

    from loadstone.engines import reader as reader_module
    from loadstone.engines import transformers as engine

    pinned_sizes, released = [], []
    monkeypatch.setattr(reader_module, "_pinned_bytes",
                        lambda n: pinned_sizes.append(n) or torch.empty(n, dtype=torch.uint8))
    monkeypatch.setattr(engine, "release_pinned_blocks", lambda: released.append(True))
    folder = tiny_checkpoint("llama")  # 2 layers: each weight shape twice, 4 norms of one size
    plan = loadstone.plan(str(folder), placement="cpu")
    tensors = plan.inventory.tensors
    device_map = {"model.embed_tokens": 0, "model.layers": "cuda:1", "model.norm": "disk", "lm_head": "cpu"}
    pinned = engine.tensors_to_pin(plan.inventory, device_map)
    # every layer tensor (q/o, k/v, the three MLP weights and the norms each come 4 or 6 times);
    # not the embedding (on the GPU, but the only tensor of its size), nor the CPU and disk ones
    assert pinned == {name for name in tensors if name.startswith("model.layers.")}
    everything_on_gpu = engine.tensors_to_pin(plan.inventory, {"": 0})
    assert "model.norm.weight" in everything_on_gpu  # the fifth norm
    assert not {"model.embed_tokens.weight", "lm_head.weight"} & everything_on_gpu  # two of their size
    (path,) = folder.glob("*.safetensors")
    with engine.safetensors_read_not_mapped(plan.inventory, device_map):
        with modeling_utils.safe_open(str(path), framework="pt", device="cpu") as handle:
            for name in tensors:
                by_slice, whole = handle.get_slice(name)[...], handle.get_tensor(name)
                assert torch.equal(by_slice, whole)
        assert not released
    assert released == [True]
    assert sorted(pinned_sizes) == sorted(2 * [tensors[name].nbytes for name in pinned])


def test_no_pinned_memory_where_the_driver_gives_none_is_a_read_into_plain_memory(tiny_checkpoint, monkeypatch):
    """Page-locked memory refused (a CPU-only torch always refuses it): the tensor is read as usual."""
    from loadstone.engines import reader as reader_module
    from loadstone.engines.reader import SafetensorsReader

    def refuse(*args, **kwargs):
        if kwargs.get("pin_memory"):
            raise RuntimeError("no pinned memory allocator is available on this system")
        return real_empty(*args, **kwargs)

    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", refuse)
    assert reader_module._pinned_bytes(64) is None
    folder = tiny_checkpoint("llama")
    plan = loadstone.plan(str(folder), placement="cpu")
    name, info = next(iter(plan.inventory.tensors.items()))
    with SafetensorsReader(plan.inventory) as reader:
        assert torch.equal(reader.read(info, pinned=True), reader.read(info))


@pytest.mark.parametrize("part", [4096, 1000])
def test_a_big_tensor_read_in_parts_in_parallel_equals_one_read(tiny_checkpoint, monkeypatch, part):
    """Every tensor split (the threshold forced down), into parts that divide it or not."""
    from safetensors.torch import load_file

    from loadstone.engines import reader as reader_module
    from loadstone.engines.reader import SafetensorsReader

    monkeypatch.setattr(reader_module, "SPLIT_AT", 1)
    monkeypatch.setattr(reader_module, "PART_BYTES", part)
    folder = tiny_checkpoint("llama", dtype="float32", hidden_size=256, intermediate_size=512)
    plan = loadstone.plan(str(folder), placement="cpu")
    expected = {}
    for path in folder.glob("*.safetensors"):
        expected.update(load_file(str(path)))
    with SafetensorsReader(plan.inventory) as reader:
        for name, info in plan.inventory.tensors.items():
            assert torch.equal(reader.read(info), expected[name]), name


def test_a_part_that_cannot_be_read_is_the_named_checkpoint_error(tiny_checkpoint, monkeypatch, tmp_path):
    """A file truncated after its header was checked: the parts past the end fail, and the read
    raises the CheckpointError that names the file and the tensor (after every part has ended)."""
    import shutil

    from loadstone.engines import reader as reader_module
    from loadstone.engines.reader import SafetensorsReader

    monkeypatch.setattr(reader_module, "SPLIT_AT", 1)
    monkeypatch.setattr(reader_module, "PART_BYTES", 1024)
    folder = tmp_path / "copy"
    shutil.copytree(tiny_checkpoint("llama", dtype="float32", hidden_size=256, intermediate_size=512), folder)
    plan = loadstone.plan(str(folder), placement="cpu")
    info = max(plan.inventory.tensors.values(), key=lambda i: i.nbytes)  # many parts
    with SafetensorsReader(plan.inventory) as reader:
        _, data_start = reader.open(info.file)  # checked against the plan, then cut short under the reader
        os.truncate(info.file, data_start + info.start + info.nbytes // 2)
        with pytest.raises(loadstone.CheckpointError, match="truncated during the load") as raised:
            reader.read(info)
    assert str(raised.value.file) == str(info.file) and repr(info.name) in str(raised.value)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_reads_in_parts_with_a_pool_of_its_own(tiny_checkpoint, monkeypatch):
    """The reader's pool threads do not exist in a child made by fork: the child, reading with the
    same reader, starts its own pool instead of waiting on them forever (it is killed after 60 s
    if it hangs). The child compares bytes, not tensors: torch's own thread pool does not survive
    a fork either."""
    import signal

    from loadstone.engines import reader as reader_module
    from loadstone.engines.reader import SafetensorsReader

    monkeypatch.setattr(reader_module, "SPLIT_AT", 1)
    monkeypatch.setattr(reader_module, "PART_BYTES", 4096)
    folder = tiny_checkpoint("llama", dtype="float32", hidden_size=256, intermediate_size=512)
    plan = loadstone.plan(str(folder), placement="cpu")
    info = max(plan.inventory.tensors.values(), key=lambda i: i.nbytes)
    with SafetensorsReader(plan.inventory) as reader:
        expected = bytes(reader.read(info).numpy())  # the reader's pool, now with threads
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads running: the child only reads
            pid = os.fork()
        if pid == 0:
            code = 1
            try:
                signal.alarm(60)
                code = 0 if bytes(reader.read(info).numpy()) == expected else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_the_read_pool_ends_with_the_reader(tiny_checkpoint, monkeypatch):
    """No thread of a load outlives it (Python warns at a later fork() while threads run)."""
    import threading

    from loadstone.engines import reader as reader_module
    from loadstone.engines.reader import SafetensorsReader

    monkeypatch.setattr(reader_module, "SPLIT_AT", 1)
    monkeypatch.setattr(reader_module, "PART_BYTES", 4096)
    plan = loadstone.plan(str(tiny_checkpoint("llama")), placement="cpu")
    with SafetensorsReader(plan.inventory) as reader:
        reader.read(max(plan.inventory.tensors.values(), key=lambda i: i.nbytes))
        assert any(t.name.startswith("loadstone-read") for t in threading.enumerate())
    assert not any(t.name.startswith("loadstone-read") for t in threading.enumerate())


def test_the_transformers_engine_says_which_tensors_it_read_into_pinned_memory(tiny_checkpoint, monkeypatch,
                                                                                same_weights):
    """Forced on any machine: the plan's layers taken as bound for a GPU (a CPU torch then gives
    plain memory, as a GPU machine's would give pinned); the report says so, the model is the same."""
    from loadstone.engines import transformers as engine

    folder = str(tiny_checkpoint("llama"))
    monkeypatch.setattr(engine, "tensors_to_pin",
                        lambda inventory, device_map: frozenset(n for n in inventory.tensors if ".layers." in n))
    loaded = loadstone.load(folder, placement="cpu", engine="transformers", progress=False)
    notes = [note for note in loaded.report.notes if "page-locked" in note]
    assert len(notes) == 1 and notes[0].startswith("engine transformers: 18 of the tensors bound for the GPU ("), notes
    monkeypatch.undo()
    plain = loadstone.load(folder, placement="cpu", engine="transformers", progress=False)
    assert not [note for note in plain.report.notes if "page-locked" in note]
    same_weights(loaded.model, plain.model)


def _fail_the_first_scratch_allocation(folder: str) -> dict:
    """A transient tensor (Mixtral's experts, fused next) read in several chunks, whose allocation
    fails for its first chunk: every other chunk must see the failure instead of taking the
    transient budget a second time, which waits for a turn that has passed."""
    import time

    from loadstone.engines import streaming

    calls = []

    def refuse(shape, dtype, nbytes):
        calls.append(nbytes)
        time.sleep(0.3)  # the item's other chunks, read by the other readers, queue on its allocation
        raise MemoryError(f"no {nbytes} bytes for this test")

    streaming.SCRATCH_MIN_BYTES, streaming.host_scratch = 1, refuse
    try:
        loadstone.load(folder, placement="cpu", engine_options={"reader": "pread", "readers": 4,
                                                                "chunk_bytes": "1MiB"}, progress=False)
    except Exception as error:  # noqa: BLE001 - the engine's plugin hook wraps it
        cause = error.__cause__ or error
        return {"raised": type(error).__name__, "cause": f"{type(cause).__name__}: {cause}", "calls": len(calls)}
    return {"raised": None, "calls": len(calls)}


def test_a_failed_allocation_is_raised_not_waited_on(tiny_checkpoint, tmp_path):
    import signal

    sys.path.insert(0, str(Path(__file__).parent))  # tests/ is not a package (--import-mode=importlib)
    from fault_support import fork

    # experts of 4 MiB (float32, 1024 x 1024): four 1 MiB chunks each
    folder = tiny_checkpoint("mixtral", hidden_size=1024, intermediate_size=1024)
    child = fork(_fail_the_first_scratch_allocation, str(folder), report=tmp_path / "child.json")
    status = child.wait(timeout=60)  # before the fix: a reader waited for its turn forever
    assert status == 0, (status, signal.SIGBUS, child.result())
    outcome = child.result()["returned"]
    assert outcome["cause"].startswith("MemoryError: no "), outcome
