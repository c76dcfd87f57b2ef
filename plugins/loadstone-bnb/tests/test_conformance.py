"""loadstone's conformance kit on the bitsandbytes backend: the checks every backend owes the
contract, run the way a third-party author runs them (``loadstone.testing.conformance`` through the
``loadstone_conformance`` fixture of loadstone's pytest plugin)."""

from __future__ import annotations

import pytest

import loadstone
from loadstone.testing import conformance
from loadstone_bnb import measured_bytes

# NF4 gets every check; FP4 and int8 the ones whose outcome depends on the method (sizes, the CPU
# quantization's work space, packed state across engines, option refusals). The training checks
# for those methods are test_training.py's.
METHOD_CHECKS = ["estimate", "peak", "engines_agree", "refusals"]
CASES = [("nf4", check) for check in conformance.BACKEND_CHECKS] + [
    (method, check) for method in ("fp4", "int8") for check in METHOD_CHECKS]
# The backend's own refusals, besides an unknown option: a malformed value of a known one.
REFUSALS = [({"quantization_options": {"double_quant": "sometimes"}}, loadstone.OptionError),
            ({"quantization_options": {"compute_dtype": "float64"}}, loadstone.OptionError)]


@pytest.mark.parametrize(("method", "check"), CASES)
def test_bitsandbytes_conforms(loadstone_conformance, method, check):
    refusals = REFUSALS if method != "int8" else []
    report = loadstone_conformance.backend(method, distribution="loadstone-bnb", refusals=refusals, only=[check])
    report.assert_ok()
    assert report[check].passed, report.render()
    if check == "engines_agree":
        measured = report[check].measured
        assert measured["engines"] == ["loadstone", "transformers"]
        # The tiny Llama has 23 parameters and buffers; the rest compared is quantization state
        # (absmax, code book, nested state, SCB ...), not only the state dict.
        assert measured["llama_tensors_compared"] > 23 + 40, measured


@pytest.mark.parametrize("method", ["nf4", "fp4", "int8"])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2_moe"])
def test_generic_measure_agrees_with_the_backend_s_own(quantized, arch, method):
    # The kit counts every tensor reachable from the model; loadstone_bnb.measured_bytes knows where
    # bitsandbytes keeps its state. Both must see the same bytes.
    model = quantized(arch, method).model
    assert conformance.stored_bytes(model) == measured_bytes(model)


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["nf4", "fp4", "int8"])
def test_bitsandbytes_conforms_on_a_gpu(loadstone_conformance, method):
    """On CUDA bitsandbytes quantizes in its kernels: the plan counts no CPU work space there, and
    the measured peak on cuda:0 must still stay within it."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (CI has none)")
    import loadstone_bnb.plugin

    manager = loadstone.PluginManager()
    if "nf4" not in {m for r in manager.components("quantization") for m in r.component.methods}:
        manager = loadstone.PluginManager(extra_plugins=[("bnb", loadstone_bnb.plugin)])  # a source tree
    report = loadstone_conformance.backend(method, plugins=manager, placement="cuda:0",
                                           only=["estimate", "peak", "engines_agree", "lora_training"])
    print(report.to_json())
    report.assert_ok()
    assert {case["device"] for case in report["peak"].measured["cases"]} == {"cuda:0"}
