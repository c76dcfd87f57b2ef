"""Every tiny architecture through every built-in placement that runs on a CPU machine and both
built-in engines, compared bit for bit (and dtype for dtype) with what transformers' own
``from_pretrained`` loads. The native engine does not offload to disk: there the cell checks
that it refuses at plan time, and that ``engine="auto"`` falls back to transformers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import loadstone
from loadstone.testing import ARCHITECTURES

# Checkpoint arguments per architecture: llama is sharded (index + 3 files), gemma is stored in
# bfloat16 so that "auto" dtype must keep a non-default dtype.
CHECKPOINT_ARGS: dict[str, dict[str, Any]] = {
    "llama": {"max_shard_size": "200KB"},
    "gemma": {"dtype": "bfloat16"},
    "mixtral": {"max_shard_size": "400KB"},
}
PLACEMENTS = ["auto", "balanced", "sequential", "cpu", "rank", "explicit", "auto+disk", "sequential+disk"]


def _grouped_map(model: Any, last_layer: str) -> dict[str, str]:
    """An explicit device map naming every decoder layer separately: the last one goes to
    ``last_layer``, everything else (embeddings, norms, heads) to the CPU."""
    import torch

    out: dict[str, str] = {}

    def walk(prefix: str, module: Any) -> None:
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            if isinstance(child, torch.nn.ModuleList):
                for i, (sub, _) in enumerate(child.named_children()):
                    out[f"{full}.{sub}"] = last_layer if i == len(child) - 1 else "cpu"
            elif any(isinstance(m, torch.nn.ModuleList) for m in child.modules()):
                walk(full + ".", child)
            else:
                out[full] = "cpu"

    walk("", model)
    return out


@pytest.fixture(scope="module")
def checkpoints(tiny_checkpoint) -> dict[str, Path]:
    return {arch: tiny_checkpoint(arch, **CHECKPOINT_ARGS.get(arch, {})) for arch in ARCHITECTURES}


@pytest.fixture(scope="module")
def references(checkpoints) -> dict[str, Any]:
    import transformers

    return {arch: transformers.AutoModelForCausalLM.from_pretrained(str(path)) for arch, path in checkpoints.items()}


def _kwargs(placement: str, folder: Path, tmp_path: Path) -> dict[str, Any]:
    if placement == "explicit":
        import torch
        import transformers

        with torch.device("meta"):
            meta = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(folder))
        return {"placement": _grouped_map(meta, "disk"), "offload_folder": str(tmp_path / "offload")}
    if placement.endswith("+disk"):
        total = loadstone.plan(str(folder), placement="cpu").report.placement["estimated_bytes"]
        return {"placement": placement.split("+")[0], "max_memory": {"cpu": int(total * 0.9)},
                "offload_folder": str(tmp_path / "offload")}
    return {"placement": placement}


@pytest.mark.parametrize("engine", ["loadstone", "transformers"])
@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_load_equals_from_pretrained(arch, placement, engine, checkpoints, references, tmp_path, same_weights,
                                     placed_as):
    folder = checkpoints[arch]
    kwargs = _kwargs(placement, folder, tmp_path)
    disk = "offload_folder" in kwargs
    if engine == "loadstone" and disk:
        with pytest.raises(loadstone.EngineError) as info:
            loadstone.plan(str(folder), engine=engine, **kwargs)
        assert "does not offload to disk" in str(info.value) and "transformers" in str(info.value.expected)
        auto = loadstone.plan(str(folder), **kwargs)
        assert auto.engine.name == "transformers"
        assert "does not offload to disk" in auto.report.decision("engine").reason
        return
    result = loadstone.load(str(folder), progress=False, engine=engine, **kwargs)
    assert result.report.engine["name"] == engine
    same_weights(result.model, references[arch])
    device_map = result.plan.device_map
    placed_as(result.model, device_map)
    if "offload_folder" in kwargs:
        assert set(map(str, device_map.values())) == {"cpu", "disk"}, device_map
        # The offloaded model computes what the reference computes.
        import torch

        ids = torch.arange(12).reshape(1, 12) % 300
        with torch.no_grad():
            assert torch.equal(result.model(ids).logits, references[arch](ids).logits)
    else:
        assert set(device_map.values()) == {"cpu"}
    assert result.report.dtype == str(references[arch].dtype).replace("torch.", "")


def test_sharded_checkpoint_is_read_through_its_index(checkpoints):
    report = loadstone.plan(str(checkpoints["llama"]), placement="cpu").report
    assert report.checkpoint["index"] == "model.safetensors.index.json"
    assert len(report.checkpoint["files"]) == 3


def test_tied_embeddings_stay_tied(checkpoints):
    model = loadstone.load(str(checkpoints["gpt2"]), placement="cpu", progress=False).model
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()


def test_cuda_placement_without_cuda_is_a_placement_error(checkpoints):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the error is for machines without it")
    assert loadstone.plan(str(checkpoints["llama"]), placement="rank").device_map == {"": "cpu"}
    cases = [("cuda:0", "placement 'cuda:0'"), ("cuda", "placement 'cuda'"), ("cuda:1", "placement 'cuda:1'"),
             ({"": "cuda:0"}, "device map entry '' -> cuda:0"),
             ({"model": "cpu", "lm_head": 1}, "device map entry 'lm_head' -> cuda:1")]
    for spec, named in cases:
        with pytest.raises(loadstone.PlacementError) as info:
            loadstone.load(str(checkpoints["llama"]), placement=spec, progress=False)
        text = str(info.value)
        assert named in text and "CUDA device" in text and "this machine has 0" in text, text
        assert info.value.fix and "cpu" in info.value.fix


def test_disk_offload_without_a_folder_says_which_option_to_pass(checkpoints):
    with pytest.raises(loadstone.PlacementError) as info:
        loadstone.load(str(checkpoints["llama"]), placement="auto", max_memory={"cpu": "300KB"}, progress=False)
    assert "offload_folder" in str(info.value)


def test_explicit_map_with_unknown_module_is_refused(checkpoints):
    with pytest.raises(loadstone.PlacementError) as info:
        loadstone.plan(str(checkpoints["llama"]), placement={"model.layerz": "cpu", "": "cpu"})
    assert "model.layerz" in str(info.value)


def test_explicit_map_that_leaves_a_module_out_is_refused(checkpoints):
    with pytest.raises(loadstone.PlacementError) as info:
        loadstone.plan(str(checkpoints["llama"]), placement={"model": "cpu"})
    assert "lm_head" in str(info.value)


@pytest.mark.parametrize("device_map", [
    {"transformer": "cpu", "lm_head": "disk"},
    {"transformer.wte": "disk", "transformer.wpe": "cpu", "transformer.drop": "cpu", "transformer.h": "cpu",
     "transformer.ln_f": "cpu", "lm_head": "cpu"},
])
def test_explicit_map_splitting_tied_weights_is_refused(device_map, checkpoints, tmp_path):
    # accelerate would crash while dispatching, or serve lm_head from a disk copy never written
    with pytest.raises(loadstone.PlacementError) as info:
        loadstone.load(str(checkpoints["gpt2"]), placement=device_map, offload_folder=str(tmp_path), progress=False)
    assert "lm_head.weight" in str(info.value) and "transformer.wte.weight" in str(info.value)
    assert "'lm_head' and 'transformer.wte'" in info.value.fix


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_explicit_dtype_equals_from_pretrained_in_that_dtype(dtype, checkpoints, same_weights):
    import torch
    import transformers

    result = loadstone.load(str(checkpoints["llama"]), placement="cpu", dtype=dtype, progress=False)
    reference = transformers.AutoModelForCausalLM.from_pretrained(str(checkpoints["llama"]), dtype=getattr(torch, dtype))
    same_weights(result.model, reference)
    assert result.report.decision("dtype").by == "user"
