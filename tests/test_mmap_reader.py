"""The native engine's opt-in ``reader=mmap``: CPU tensors as copy-on-write views of the files."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct

import pytest

import loadstone
from loadstone.testing import ARCHITECTURES

MMAP = {"reader": "mmap"}


def _mapped_ranges(path: str) -> list[tuple[int, int]]:
    """Address ranges of this process mapped from ``path`` (Linux: /proc/self/maps)."""
    ranges = []
    real = os.path.realpath(path)
    with open("/proc/self/maps") as fh:
        for line in fh:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].strip() == real:
                low, high = (int(x, 16) for x in parts[0].split("-"))
                ranges.append((low, high))
    return ranges


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_mapped_models_equal_read_ones_for_every_architecture(arch, tiny_checkpoint, same_weights):
    """Fused (MoE experts) and tied tensors still go through the stream; the rest are mapped: the
    model is the same, bit for bit, as the default reader's and the transformers engine's."""
    folder = str(tiny_checkpoint(arch, dtype="bfloat16"))
    mapped = loadstone.load(folder, placement="cpu", engine_options=MMAP, progress=False)
    read = loadstone.load(folder, placement="cpu", progress=False)
    reference = loadstone.load(folder, placement="cpu", engine="transformers", progress=False)
    same_weights(mapped.model, read.model)
    same_weights(mapped.model, reference.model)
    assert mapped.report.engine["options"]["reader"] == "mmap"
    note = next(n for n in mapped.report.notes if "copy-on-write views" in n)
    assert int(note.split("engine loadstone: ")[1].split()[0]) > 0, note


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads /proc/self/maps (Linux)")
def test_mapped_parameters_live_in_the_file_pages_and_writes_stay_private(tiny_checkpoint, tmp_path):
    import torch

    folder = tmp_path / "model"
    shutil.copytree(tiny_checkpoint("llama", dtype="bfloat16"), folder)
    weights = folder / "model.safetensors"
    before = _sha(weights)
    result = loadstone.load(str(folder), placement="cpu", engine_options=MMAP, progress=False)
    ranges = _mapped_ranges(str(weights))
    assert ranges, "the weights file is not mapped"
    params = dict(result.model.named_parameters())
    inside = [n for n, p in params.items() if any(lo <= p.data_ptr() < hi for lo, hi in ranges)]
    assert len(inside) == len(params), sorted(set(params) - set(inside))
    weight = params["model.layers.0.mlp.down_proj.weight"]
    with torch.no_grad():
        weight.add_(1.0)  # copy-on-write: the process sees it, the file does not
    assert _sha(weights) == before
    again = loadstone.load(str(folder), placement="cpu", engine_options=MMAP, progress=False)
    assert not torch.equal(again.model.get_parameter("model.layers.0.mlp.down_proj.weight"), weight)


def test_casts_are_read_not_mapped_and_lora_trains_on_a_mapped_base(tiny_checkpoint, same_weights):
    import torch
    from peft import LoraConfig, get_peft_model

    folder = str(tiny_checkpoint("llama", dtype="bfloat16"))
    cast = loadstone.load(folder, placement="cpu", dtype="float32", engine_options=MMAP, progress=False)
    same_weights(cast.model, loadstone.load(folder, placement="cpu", dtype="float32", progress=False).model)
    assert any("reader=mmap mapped no tensor" in n for n in cast.report.notes)  # every tensor is cast: read
    assert any("pread reader threads" in n for n in cast.report.notes)

    result = loadstone.load(folder, placement="cpu", engine_options=MMAP, trainable=True, progress=False)
    model = get_peft_model(result.model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    ids = torch.arange(12).reshape(2, 6)
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all("lora_" in n and g is not None for n, g in grads.items())


def test_a_tensor_unaligned_in_its_file_is_read_instead(tiny_checkpoint, tmp_path, same_weights):
    """safetensors pads its header to 8 bytes, but a file may not: with an odd header length every
    bf16 tensor is misaligned for a view, and each is read with pread instead."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_checkpoint("llama", dtype="bfloat16"), folder)
    weights = folder / "model.safetensors"
    raw = weights.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.dumps(json.loads(raw[8:8 + n]), separators=(",", ":")).encode()
    if len(header) % 2 == 0:
        header += b" "
    weights.write_bytes(struct.pack("<Q", len(header)) + header + raw[8 + n:])
    mapped = loadstone.load(str(folder), placement="cpu", engine_options=MMAP, progress=False)
    same_weights(mapped.model, loadstone.load(str(folder), placement="cpu", progress=False).model)
    assert any("reader=mmap mapped no tensor" in n for n in mapped.report.notes)


def test_mmap_is_refused_at_plan_time_where_nothing_stays_on_the_cpu(tiny_checkpoint):
    from loadstone.engines.native import NativeEngine

    plan = loadstone.plan(str(tiny_checkpoint("llama")), placement="cpu", engine_options=MMAP)
    assert plan.engine_options["reader"] == "mmap" and plan.report.engine["options"]["reader"] == "mmap"
    engine_line = next(line for line in plan.report.render().splitlines() if line.startswith("engine "))
    assert engine_line.endswith(f"loadstone (loadstone {loadstone.__version__}), reader=mmap, unleased=map"), engine_line
    plan.device_map = {"": 0}  # what a plan onto cuda:0 holds; CI has no GPU to plan one for real
    with pytest.raises(loadstone.OptionError) as info:
        NativeEngine().extra_bytes(plan)
    assert info.value.field == "engine option reader" and "places none there" in info.value.message
    assert "placement='cpu'" in info.value.fix
