"""Weights packed on the CPU (NF4, int8) are packed straight from their files' pages where
``reader=mmap`` (or ``reader=auto`` on a warm page cache) maps the checkpoint, and those pages are
given back as soon as each weight is packed; a weight the model holds after all is kept and
protected by the lease like any other mapped tensor (``loadstone.engines.mapped``)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import loadstone
from loadstone.engines import leases
from loadstone.engines.mapped import _held_by_model
from loadstone.engines.reader import SafetensorsReader
from loadstone.stages.inspect import inspect_checkpoint
from loadstone.testing import plugins_with

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="file leases and smaps are Linux's")


def _load(folder: str, reader: str, method: str = "nf4"):
    return loadstone.load(folder, quantization=method, placement="cpu", trainable=False, progress=False,
                          engine_options={"reader": reader}, plugins=plugins_with(method, "loadstone_bnb.plugin", "bnb"))


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_weights_packed_from_the_mapping_equal_read_ones(method, tiny_checkpoint, same_weights):
    folder = str(tiny_checkpoint("llama", dtype="bfloat16", max_shard_size="200KB"))
    mapped, read = _load(folder, "mmap", method), _load(folder, "pread", method)
    same_weights(mapped.model, read.model)  # packed weights and quantization state, bit for bit
    (note,) = [n for n in mapped.report.notes if "copy-on-write views" in n]
    assert "weights were packed straight from their files' pages, which were given back once packed" in note


def _resident_kib(address: int) -> int:
    """Resident KiB of the mapping of this process that holds ``address`` (/proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as fh:
        for line in fh:
            head = line.split(maxsplit=1)[0]
            if "-" in head and not head.endswith(":"):
                low, high = (int(x, 16) for x in head.split("-"))
                inside = low <= address < high
            elif inside and head == "Rss:":
                return int(line.split()[1])
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.fixture
def big_tensor_file(tmp_path) -> Path:
    from safetensors.torch import save_file

    folder = tmp_path / "ckpt"
    folder.mkdir()
    save_file({"a": torch.ones(1024, dtype=torch.bfloat16), "w": torch.randn(2048, 2048, dtype=torch.bfloat16),
               "z": torch.ones(1024, dtype=torch.bfloat16)}, str(folder / "model.safetensors"))
    return folder


def _read(inventory, info):
    with SafetensorsReader(inventory) as reader:
        return reader.read(info)


def test_a_passing_weights_pages_are_given_back_and_read_again_if_touched(big_tensor_file):
    inventory = inspect_checkpoint(big_tensor_file)
    info = inventory.tensors["w"]  # 8 MiB
    expected = _read(inventory, info)
    with SafetensorsReader(inventory) as reader:
        view = reader.map(info, passing=True)
        assert reader.mapped_files[info.file][0] == "leased"
        total = float(view.float().sum())
        address = view.data_ptr()
        assert _resident_kib(address) >= info.nbytes // 1024
        assert reader.give_back(info)
        assert _resident_kib(address) < 64  # the pages it shares with its neighbours, at most
        assert float(view.float().sum()) == total and torch.equal(view, expected)  # read from the file again


def test_a_passing_weight_is_not_copied_by_a_lease_break_unless_the_model_keeps_it(big_tensor_file):
    inventory = inspect_checkpoint(big_tensor_file)
    info = inventory.tensors["w"]
    with SafetensorsReader(inventory) as reader:
        kept = reader.map(inventory.tensors["a"])
        view = reader.map(info, passing=True)
        mapping = reader._maps[info.file]
        entry = leases._entry_of(mapping)
        start = view.data_ptr() - entry.address
        assert [r for r in entry.ranges if r[0] == start] == []  # only passing: a break after the load skips it
        model = torch.nn.Module()
        model.register_buffer("kept", kept)
        assert _held_by_model(model, [((view.data_ptr(), view.data_ptr() + info.nbytes), info)]) == []
        model.register_buffer("held", view[3:])  # a backend kept (a view of) it as it is
        assert _held_by_model(model, [((view.data_ptr(), view.data_ptr() + info.nbytes), info)]) == [info]
        reader.keep(info)
        assert (start, start + info.nbytes) in entry.ranges  # now a break copies it like any tensor's


def test_pre_quantized_checkpoints_are_never_given_back(tiny_checkpoint, tmp_path):
    """A packed checkpoint's tensors are the backend's to keep as they are: read, not mapped."""
    folder = tmp_path / "nf4-saved"
    loaded = _load(str(tiny_checkpoint("llama", dtype="bfloat16")), "pread")
    loaded.model.save_pretrained(folder)
    again = loadstone.load(str(folder), placement="cpu", trainable=False, progress=False, engine="loadstone",
                           engine_options={"reader": "mmap"}, plugins=plugins_with("nf4", "loadstone_bnb.plugin", "bnb"))
    assert not any("packed straight" in n for n in again.report.notes)
