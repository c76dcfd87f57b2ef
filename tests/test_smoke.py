"""End-to-end: an adapter folder loads onto its base and trains only the adapter."""

import loadstone
from loadstone.demo import one_training_step


def test_adapter_reference_loads_base_and_trains_only_adapter(tiny_adapter):
    adapter = tiny_adapter("llama")
    result = loadstone.load(str(adapter), placement="cpu", progress=False)
    report = result.report.to_dict()
    assert report["sources"]["adapters"][0]["name"] == "default"
    assert report["parameters"]["trainable"] > 0
    assert report["parameters"]["trainable"] < report["parameters"]["total"]
    step = one_training_step(result.model)
    assert step["all_gradients_on_adapter"], step
