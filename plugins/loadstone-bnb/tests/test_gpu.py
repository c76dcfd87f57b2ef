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


@pytest.mark.parametrize("options", [{}, {"reader": "pread", "in_flight": 0}, {"reader": "pread", "in_flight": "auto"}],
                         ids=["auto", "pread-one-at-a-time", "pread-in-flight"])
@pytest.mark.parametrize("method", ["nf4", "fp4", "int8"])
@pytest.mark.parametrize("arch", ["llama", "qwen2_moe"])
def test_native_engine_on_gpu_equals_transformers(tiny_checkpoint, manager, method, arch, options):
    """Quantized on the GPU tensor by tensor: packed weights and state equal transformers + bitsandbytes,
    whichever reader, and however many tensors wait to be quantized at once."""
    folder = tiny_checkpoint(arch, dtype="bfloat16", hidden_size=256, intermediate_size=512)
    kwargs = dict(quantization=method, placement="cuda:0", trainable=False, progress=False, plugins=manager)
    native = loadstone.load(str(folder), engine="loadstone", engine_options=options, **kwargs).model
    reference = loadstone.load(str(folder), engine="transformers", **kwargs).model
    ours, theirs = native.state_dict(), reference.state_dict()
    assert sorted(ours) == sorted(theirs)
    different = [k for k in ours if isinstance(ours[k], torch.Tensor) and not torch.equal(ours[k], theirs[k])]
    assert not different, different[:5]


@pytest.mark.parametrize("in_flight", [0, "auto", "1MiB"])
def test_quantized_pread_loads_stay_within_the_planned_peak(tiny_checkpoint, manager, in_flight):
    """The transient tensors in flight are part of the plan's peak: the load never asks torch's
    allocator for more. (Asked, not allocated: the allocator may hand out a cached block whole
    when less than 1 MiB of it would be left over, which is the allocator's rounding, not the
    load's.) This caught the stream's iterator keeping a handed-over tensor alive."""
    folder = tiny_checkpoint("llama", dtype="bfloat16", hidden_size=512, intermediate_size=2048, num_hidden_layers=4)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_stats()["requested_bytes.all.current"]
    result = loadstone.load(str(folder), quantization="nf4", placement="cuda:0", trainable=False, progress=False,
                            plugins=manager, engine="loadstone", engine_options={"reader": "pread", "in_flight": in_flight})
    peak = torch.cuda.memory_stats()["requested_bytes.all.peak"] - before
    planned = result.report.placement["peak_bytes_per_device"]["cuda:0"]
    allowance = {0: 0, "auto": 256 << 20, "1MiB": 1 << 20}[in_flight]
    assert result.plan.engine_options["in_flight"] == allowance
    assert result.report.engine.get("extra_bytes", {}).get("cuda:0", 0) == allowance
    assert 0 < peak <= planned, (peak, planned)
