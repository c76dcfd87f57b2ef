"""A weight-only int8 backend written as a third party would (tests/fixtures/dists/loadstone-int8wo):
per-channel absmax in plain torch, its own ``nn.Linear`` subclass swapped in by ``convert_skeleton``,
each weight quantized in ``load_tensor`` on its device. Installed as a real distribution and found
through its entry point; it uses loadstone's public contract only.
"""

from __future__ import annotations

import gc
import sys

import pytest

import loadstone
from loadstone.testing import conformance

pytestmark = pytest.mark.slow  # installs a distribution

DIST = "loadstone-int8wo"


@pytest.fixture(scope="module")
def int8wo(fixture_dist):
    """A plugin manager that sees the installed distribution (and the built-ins) only."""
    site = str(fixture_dist(DIST))
    sys.path.insert(0, site)
    try:
        manager = loadstone.PluginManager(allow=[DIST], disable=[], strict=True)
        assert manager.quantization_backend("int8wo").distribution == DIST
        yield manager
    finally:
        sys.path.remove(site)


@pytest.fixture(scope="module")
def wide_llama(tiny_checkpoint):
    """Layers wider than the backend's 1 MiB work chunk (a 2048x512 float32 weight is 4 MiB), so
    that one full-precision tensor in flight and two are told apart by the measurement."""
    return tiny_checkpoint("llama", hidden_size=512, intermediate_size=2048)


@pytest.mark.parametrize("check", list(conformance.BACKEND_CHECKS))
def test_passes_the_conformance_kit(int8wo, loadstone_conformance, check):
    report = loadstone_conformance.backend("int8wo", plugins=int8wo, distribution=DIST, only=[check])
    result = report[check]
    if check == "engines_agree":  # the transformers engine cannot run it: the refusals check proves that
        assert result.status == "skipped" and result.reason.startswith("only loadstone can run"), report.render()
        return
    report.assert_ok()
    assert result.passed, report.render()


def test_loads_natively_with_its_own_layer(int8wo, tiny_checkpoint):
    import torch

    folder = str(tiny_checkpoint("llama"))
    result = loadstone.load(folder, quantization="int8wo", placement="cpu", trainable=False, progress=False,
                            plugins=int8wo)
    layer = result.model.model.layers[0].self_attn.q_proj
    assert type(layer).__name__ == "Int8Linear" and isinstance(layer, torch.nn.Linear)
    assert layer.weight.dtype == torch.int8 and layer.weight_scale.dtype == torch.float32
    assert type(result.model.lm_head) is torch.nn.Linear  # kept in the load dtype by default
    assert result.report.engine["name"] == "loadstone"
    assert "int8wo: 14 linear layers hold int8 weights with a float32 scale per output channel" in result.report.notes
    reference = loadstone.load(folder, placement="cpu", trainable=False, progress=False, plugins=int8wo).model
    ids = torch.arange(32).reshape(2, 16) % 300
    with torch.no_grad():
        want, got = reference(ids).logits, result.model(ids).logits
    error = float((got - want).norm() / want.norm())
    assert error < 0.02, f"relative logits error {error:.4f} (per-channel int8 measured 0.006 here)"


def test_holds_one_full_precision_tensor_in_flight_at_most(int8wo, wide_llama):
    import torch
    from loadstone_int8wo.layer import workspace_bytes  # the installed distribution's own bound

    plan = loadstone.plan(str(wide_llama), quantization="int8wo", placement="cpu", trainable=False, plugins=int8wo)
    backend = int8wo.quantization_backend("int8wo").component
    gc.collect()
    # Each load_tensor call measured on its own (the engine reads in reader threads, the backend
    # converts in the calling thread): the tensor handed over, the call's work tensors, and any
    # earlier full-precision tensor something still holds.
    with conformance.ConversionMeter(backend) as meter, conformance.AllocationPeak() as peak:
        result = loadstone.load(str(wide_llama), quantization="int8wo", placement="cpu", trainable=False,
                                progress=False, plugins=int8wo)
    gc.collect()
    weights = [c for c in meter.calls if c.label.endswith(".weight") and not c.kept]
    assert len(weights) == 14 and all(c.floating for c in weights)  # 7 linear layers x 2 decoder layers
    largest = 2048 * 512 * 4  # an MLP weight in float32: 4 MiB
    bound = largest + workspace_bytes(2048, 512, torch.float32)
    in_flight = max(c.in_flight(peak) for c in weights)
    # Measured: 5242880 B (the 4 MiB weight + one 1 MiB float32 chunk); two weights would be 8 MiB.
    assert largest < in_flight <= bound < 2 * largest, (in_flight, bound)
    assert all(c.earlier_alive == 0 for c in meter.calls), [(c.label, c.earlier_alive) for c in meter.calls]
    assert meter.handed_and_still_alive() == []  # no full-precision copy outlives its conversion
    assert plan.peak_bytes_per_device["cpu"] - plan.bytes_per_device["cpu"] == bound
    assert conformance.stored_bytes(result.model) == plan.bytes_per_device["cpu"]


def test_transformers_engine_is_refused_at_plan_time(int8wo, tiny_checkpoint):
    with pytest.raises(loadstone.EngineError) as info:
        loadstone.plan(str(tiny_checkpoint("llama")), quantization="int8wo", engine="transformers", plugins=int8wo)
    message = info.value.message
    assert message.startswith("engine 'transformers' (plugin 'builtin-engines' from loadstone")
    assert "quantization backend 'int8wo' converts weights only itself (load_tensor)" in message
    assert info.value.fix.startswith("use engine='auto'") and "'loadstone'" in info.value.fix


def test_auto_picks_the_native_engine_and_the_report_says_why(int8wo, tiny_checkpoint):
    plan = loadstone.plan(str(tiny_checkpoint("llama")), quantization="int8wo", plugins=int8wo)
    decision = plan.report.decision("engine")
    assert (decision.choice, decision.distribution) == ("loadstone", "loadstone")
    assert decision.reason == "auto: the first engine (by preference) that can run this plan"
    assert plan.report.engine["not_able"] == {"transformers": [
        "quantization backend 'int8wo' converts weights only itself (load_tensor), which from_pretrained cannot call"]}


@pytest.mark.parametrize("keep", ["mlp.down_proj", ["mlp.down_proj", 3], []])
def test_keep_modules_is_checked(int8wo, tiny_checkpoint, keep):
    folder = str(tiny_checkpoint("llama"))
    options = {"keep_modules": keep}
    if isinstance(keep, list) and all(isinstance(k, str) for k in keep):
        result = loadstone.load(folder, quantization="int8wo", quantization_options=options, placement="cpu",
                                progress=False, trainable=False, plugins=int8wo)
        assert type(result.model.lm_head).__name__ == "Int8Linear"  # an empty keep list quantizes lm_head too
        return
    with pytest.raises(loadstone.OptionError) as info:
        loadstone.plan(folder, quantization="int8wo", quantization_options=options, plugins=int8wo)
    assert info.value.field == "quantization_options.keep_modules" and info.value.fix


def test_kept_layer_stays_a_plain_linear_and_the_estimate_follows(int8wo, tiny_checkpoint):
    import torch

    folder = str(tiny_checkpoint("llama"))
    options = {"keep_modules": ["lm_head", "mlp.down_proj"]}
    plan = loadstone.plan(folder, quantization="int8wo", quantization_options=options, placement="cpu",
                          trainable=False, plugins=int8wo)
    result = loadstone.load(folder, quantization="int8wo", quantization_options=options, placement="cpu",
                            trainable=False, progress=False, plugins=int8wo)
    down = result.model.model.layers[1].mlp.down_proj
    assert type(down) is torch.nn.Linear and down.weight.dtype == torch.float32
    assert plan.bytes_per_device["cpu"] == conformance.stored_bytes(result.model)


@pytest.mark.gpu
def test_quantizes_on_the_gpu_within_its_plan(int8wo, loadstone_conformance):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (CI has none)")
    report = loadstone_conformance.backend("int8wo", plugins=int8wo, placement="cuda:0",
                                           only=["estimate", "peak", "lora_training", "gradient_checkpointing"])
    print(report.to_json())
    report.assert_ok()
