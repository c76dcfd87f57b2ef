"""Fuzz the header and index readers: whatever the bytes, only loadstone's typed errors come out.

Derandomized and bounded (a few hundred examples in all) so the suite stays fast and a failure
reproduces on every run; hypothesis prints the smallest input that broke it.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loadstone import CheckpointError
from loadstone.safetensors_header import SAFETENSORS_DTYPE_BITS, read_safetensors_header
from loadstone.stages.inspect import inspect_checkpoint

FUZZ = settings(max_examples=120, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])

json_scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=12)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
dims = st.integers(-2, 5) | st.sampled_from([True, 1.5, "4", None, 2**65])
entries = st.fixed_dictionaries(
    {"dtype": st.sampled_from(sorted(SAFETENSORS_DTYPE_BITS)) | json_values,
     "shape": st.lists(dims, max_size=3) | json_values,
     "data_offsets": st.lists(st.integers(-4, 80), min_size=0, max_size=3) | json_values},
    optional={"extra": json_values})
headers = st.dictionaries(st.text(max_size=10), entries | json_values, max_size=5)


def _write(path: Path, header: bytes, data: bytes, declared: int | None) -> None:
    length = len(header) if declared is None else declared
    path.write_bytes(length.to_bytes(8, "little") + header + data)


def _check_tiles(tensors, data_size: int) -> None:
    """When a header is accepted, its tensors must cover the data section exactly."""
    cursor = 0
    for info in sorted(tensors.values(), key=lambda t: t.start):
        assert info.start == cursor
        cursor = info.end
    assert cursor == data_size


@FUZZ
@given(header=st.binary(max_size=120), data=st.binary(max_size=48),
       declared=st.none() | st.integers(0, 2**64 - 1))
def test_raw_header_bytes(header, data, declared):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        _write(path, header, data, declared)
        try:
            tensors, _ = read_safetensors_header(path)
        except CheckpointError:
            return
        _check_tiles(tensors, len(data))


@FUZZ
@given(header=headers, metadata=st.none() | json_values, data_size=st.integers(0, 80), duplicate=st.booleans())
def test_structured_headers(header, metadata, data_size, duplicate):
    body = dict(header)
    if metadata is not None:
        body["__metadata__"] = metadata
    text = json.dumps(body)
    if duplicate and header:  # JSON allows repeated keys; the safetensors format does not
        name = next(iter(header))
        text = text[:-1] + ", " + json.dumps({name: header[name]})[1:]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        _write(path, text.encode(), b"\0" * data_size, None)
        try:
            tensors, _ = read_safetensors_header(path)
        except CheckpointError:
            return
        _check_tiles(tensors, data_size)


SHARD = "model-00001-of-00001.safetensors"
shard_names = st.sampled_from([SHARD, "../" + SHARD, "/" + SHARD, "", ".", "sub/" + SHARD, "x" * 300,
                               "a\x00b", "link.safetensors", "missing.safetensors"]) | st.text(max_size=20)
indexes = st.fixed_dictionaries({"weight_map": st.dictionaries(st.sampled_from(["a", "b", "c"]) | st.text(max_size=6),
                                                               shard_names | json_values, max_size=4)},
                                optional={"metadata": json_values}) | json_values


@FUZZ
@given(index=indexes, raw=st.none() | st.binary(max_size=40))
def test_index_json(index, raw):
    with tempfile.TemporaryDirectory() as tmp:
        outside = Path(tmp) / "outside"
        folder = Path(tmp) / "ckpt"
        outside.mkdir()
        folder.mkdir()
        # A valid shard holding tensors "a" and "b", and a link leading out of the folder.
        header = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                  "b": {"dtype": "U8", "shape": [3], "data_offsets": [8, 11]}}
        _write(folder / SHARD, json.dumps(header).encode(), b"\0" * 11, None)
        _write(outside / SHARD, json.dumps(header).encode(), b"\0" * 11, None)
        (folder / "link.safetensors").symlink_to(outside / SHARD)
        index_path = folder / "model.safetensors.index.json"
        index_path.write_bytes(raw if raw is not None else json.dumps(index).encode())
        try:
            inventory = inspect_checkpoint(folder)
        except CheckpointError:
            return
        # Accepted: every tensor the index names sits, inside the folder, in the shard it says.
        weight_map = index["weight_map"]
        assert set(weight_map) <= set(inventory.tensors)
        for name, shard in weight_map.items():
            assert inventory.tensors[name].file.resolve().is_relative_to(folder.resolve())
            assert inventory.tensors[name].file.name == Path(shard).name
