"""NF4 / FP4 / int8 on a real CUDA device. CI has no GPU; these run on the lent GPU machine."""

import pytest
import torch

import loadstone


@pytest.fixture(scope="module")
def manager():
    """The environment's plugins; loadstone-bnb added in-process where its entry point is not
    installed (the GPU machine runs from a source tree on PYTHONPATH)."""
    from loadstone.testing import plugins_with

    return plugins_with("nf4", "loadstone_bnb.plugin", "bnb")


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (CI has none)"),
]


@pytest.mark.parametrize("method", ["nf4", "fp4", "int8"])
def test_quantized_on_gpu_matches_unquantized_and_plan(tiny_checkpoint, manager, method):
    import bitsandbytes as bnb

    from loadstone_bnb import measured_bytes

    folder = tiny_checkpoint("llama", dtype="bfloat16", hidden_size=256, intermediate_size=512)
    result = loadstone.load(str(folder), quantization=method, placement="cuda:0", trainable=False, progress=False,
                            plugins=manager)
    layer = result.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, bnb.nn.Linear8bitLt if method == "int8" else bnb.nn.Linear4bit)
    assert layer.weight.device.type == "cuda"
    # the plan's estimate is the real footprint on the device (within 5%)
    real = measured_bytes(result.model)
    assert abs(result.report.placement["estimated_bytes"] - real) <= 0.05 * real
    assert result.report.memory["peak_device_bytes"]["cuda:0"] > 0
    plain = loadstone.load(str(folder), placement="cuda:0", trainable=False, progress=False).model
    ids = torch.randint(0, 320, (2, 16), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.no_grad():
        a, b = result.model(ids).logits.float(), plain(ids).logits.float()
    # relative L2 error of the logits on a random tiny model; FP4 is the coarsest grid (0.27 seen on an H200)
    tolerance = {"int8": 0.03, "nf4": 0.25, "fp4": 0.4}[method]
    assert ((a - b).norm() / b.norm()).item() < tolerance


def test_qlora_step_on_gpu_trains_only_the_adapter(tiny_adapter, manager):
    from loadstone.demo import one_training_step

    adapter = tiny_adapter("llama", checkpoint_kwargs={"dtype": "bfloat16"})
    result = loadstone.load(str(adapter), quantization="nf4", placement="cuda:0", progress=False,
                            plugins=manager)
    step = one_training_step(result.model)
    assert step["all_gradients_on_adapter"], step


@pytest.mark.parametrize("method", ["nf4", "fp4", "int8"])
@pytest.mark.parametrize("arch", ["llama", "qwen2_moe"])
def test_native_engine_on_gpu_equals_transformers(tiny_checkpoint, manager, method, arch):
    """Quantized on the GPU tensor by tensor: packed weights and state equal transformers + bitsandbytes."""
    folder = tiny_checkpoint(arch, dtype="bfloat16", hidden_size=256, intermediate_size=512)
    kwargs = dict(quantization=method, placement="cuda:0", trainable=False, progress=False, plugins=manager)
    native = loadstone.load(str(folder), engine="loadstone", **kwargs).model
    reference = loadstone.load(str(folder), engine="transformers", **kwargs).model
    ours, theirs = native.state_dict(), reference.state_dict()
    assert sorted(ours) == sorted(theirs)
    different = [k for k in ours if isinstance(ours[k], torch.Tensor) and not torch.equal(ours[k], theirs[k])]
    assert not different, different[:5]
