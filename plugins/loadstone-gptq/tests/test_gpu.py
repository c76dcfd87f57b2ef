"""GPTQ on a real CUDA device: a training-capable kernel, one LoRA step, the estimate, and the
inference kernel gptqmodel picks there. CI has no GPU; these run on the lent GPU machine
(command in plugins/loadstone-gptq/README.md)."""

import pytest
import torch

import loadstone

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (CI has none)"),
]


@pytest.fixture(scope="module")
def manager():
    """The environment's plugins; loadstone-gptq added in-process where its entry point is not
    installed (the GPU machine runs from a source tree on PYTHONPATH)."""
    from loadstone.testing import plugins_with

    return plugins_with("gptq", "loadstone_gptq.plugin", "gptq")


def test_lora_step_on_gpu_with_a_training_kernel(gptqmodel_checkpoint, tiny_adapter, manager):
    from loadstone.demo import one_training_step
    from loadstone_gptq import measured_bytes

    folder = gptqmodel_checkpoint()  # quantized on the CPU; loaded onto the GPU
    result = loadstone.load(str(tiny_adapter("llama")), base=str(folder), placement="cuda:0", progress=False,
                            plugins=manager)
    kernel = result.report.quantization["kernel"]
    assert kernel["class"] == "TorchLinear" and "backward" in kernel["reason"], kernel
    layer = result.model.get_submodule("base_model.model.model.layers.0.self_attn.q_proj").get_base_layer()
    assert layer.qweight.device.type == "cuda"
    step = one_training_step(result.model)
    assert step["all_gradients_on_adapter"], step
    base = loadstone.load(str(folder), placement="cuda:0", progress=False, plugins=manager)
    real = measured_bytes(base.model)
    assert abs(base.report.placement["estimated_bytes"] - real) <= 0.05 * real
    assert base.report.memory["peak_device_bytes"]["cuda:0"] > 0


def test_inference_kernel_on_gpu_matches_the_exact_cpu_load(gptqmodel_checkpoint, manager):
    folder = gptqmodel_checkpoint()
    fast = loadstone.load(str(folder), placement="cuda:0", trainable=False, progress=False, plugins=manager,
                          dtype="float16")
    exact = loadstone.load(str(folder), placement="cpu", trainable=False, progress=False, plugins=manager,
                           dtype="float32")
    print("GPU inference kernel:", fast.report.quantization["kernel"])
    ids = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = fast.model(ids.to("cuda:0")).logits.float().cpu()
        b = exact.model(ids).logits
    assert ((a - b).norm() / b.norm()).item() < 0.01


def test_training_refuses_an_inference_kernel_on_gpu(gptqmodel_checkpoint, manager):
    with pytest.raises(loadstone.OptionError, match="backward|no kernel"):
        loadstone.load(str(gptqmodel_checkpoint()), placement="cuda:0", progress=False, plugins=manager,
                       quantization_options={"backend": "gptq_marlin"})
