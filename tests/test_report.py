"""The load report: JSON, who decided what, parameter counts, stage timings, memory."""

from __future__ import annotations

import json

import pytest

import loadstone

PLUGIN_LABELS = ("backend ", "strategy ", "resolver ", "engine ")


@pytest.fixture(scope="module")
def adapter_load(llama_lora):
    return loadstone.load(str(llama_lora), placement="cpu", progress=False)


def _assert_decisions_name_their_plugin(report: dict) -> None:
    for decision in report["decisions"]:
        if decision["by"].startswith(PLUGIN_LABELS):
            assert decision["plugin"] and decision["distribution"] and decision["version"], decision
            assert " " not in decision["distribution"], decision  # a name, the version is its own field
        else:
            assert decision["by"] in ("kernel", "user"), decision


def test_report_is_plain_json(adapter_load, sharded_llama):
    for report in (adapter_load.report, loadstone.plan(str(sharded_llama)).report):
        data = report.to_dict()
        assert json.loads(json.dumps(data)) == data  # no default=str needed: nothing but JSON types
        assert json.loads(report.to_json()) == data


def test_every_plugin_decision_names_plugin_distribution_and_version(adapter_load, sharded_llama, tmp_path):
    data = adapter_load.report.to_dict()
    _assert_decisions_name_their_plugin(data)
    topics = {d["topic"]: d for d in data["decisions"]}
    assert {"source", "base", "base source", "task", "dtype", "quantization", "placement", "engine"} <= set(topics)
    assert (topics["engine"]["choice"], topics["engine"]["plugin"]) == ("loadstone", "builtin-engines")
    assert (topics["source"]["by"], topics["source"]["plugin"], topics["source"]["distribution"],
            topics["source"]["version"]) == ("resolver local", "builtin-resolvers", "loadstone", loadstone.__version__)
    assert topics["placement"]["plugin"] == "builtin-placement"
    for section in ("quantization", "placement"):
        assert data[section]["distribution"] == "loadstone" and data[section]["version"] == loadstone.__version__
    offloaded = loadstone.plan(str(sharded_llama), placement="sequential", max_memory={"cpu": "300KB"},
                               offload_folder=str(tmp_path), dtype="bf16").report.to_dict()
    _assert_decisions_name_their_plugin(offloaded)
    assert {d["topic"]: d["by"] for d in offloaded["decisions"]}["dtype"] == "user"


def test_parameter_counts_are_the_models(adapter_load):
    model = adapter_load.model
    params = list(model.parameters())
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    counts = adapter_load.report.parameters
    assert counts["total"] == total and counts["trainable"] == trainable
    assert counts["frozen"] == total - trainable and trainable > 0
    assert counts["trainable_percent"] == pytest.approx(100 * trainable / total)
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert trainable == lora
    assert counts["total"] - lora == adapter_load.plan.parameter_count  # the base, as planned


def test_tied_weights_are_counted_once_and_the_estimate_is_the_real_size(tiny_checkpoint):
    loaded = loadstone.load(str(tiny_checkpoint("gpt2")), placement="cpu", progress=False)
    model = loaded.model
    unique = {p.data_ptr(): p for p in model.parameters()}
    assert loaded.report.parameters["total"] == sum(p.numel() for p in unique.values())
    real_bytes = sum(t.numel() * t.element_size() for t in list(unique.values()) + list(model.buffers()))
    assert loaded.report.placement["estimated_bytes"] == real_bytes
    assert loaded.report.placement["bytes_per_device"] == {"cpu": real_bytes}


def test_stage_timings_and_memory(adapter_load, sharded_llama):
    report = adapter_load.report
    # first-import time is its own entry, not charged to the stage that happened to import
    assert list(report.stages) == ["imports", "resolve", "inspect", "plan", "load_weights", "prepare", "adapters",
                                   "report"]
    assert [s for s in report.stages if s != "imports"] == [s for s in loadstone.STAGES if s != "before_load"]
    assert all(isinstance(t, float) and t >= 0 for t in report.stages.values())
    planned = loadstone.plan(str(sharded_llama)).report
    assert list(planned.stages) == ["imports", "resolve", "inspect", "plan"]
    from loadstone.telemetry import current_rss

    peak = report.memory["peak_host_rss_bytes"]
    assert isinstance(peak, int) and 50 * 2**20 < peak <= max(current_rss(), peak)
    assert report.memory["peak_device_bytes"] == {}  # CPU load: no accelerator memory
    assert planned.memory == {}  # a plan allocates nothing worth reporting


def test_sources_checkpoint_and_training_sections(adapter_load, sharded_llama):
    data = adapter_load.report.to_dict()
    assert data["kind"] == "load" and data["loadstone_version"] == loadstone.__version__
    assert data["sources"]["base"]["path"] == str(sharded_llama.resolve())
    assert data["checkpoint"]["format"] == "safetensors" and data["checkpoint"]["tensors"] == 21
    assert data["model"] == {"model_type": "llama", "architecture": "LlamaForCausalLM",
                             "auto_class": "AutoModelForCausalLM", "task": "causal-lm"}
    assert data["training"]["trainable"] is True and "base model frozen" in data["training"]["notes"]
    assert data["quantization"]["method"] == "none" and data["quantization"]["pre_quantized"] is False
    text = adapter_load.report.render()
    assert "parameters" in text and "trainable" in text and "peak host RSS" in text and "decisions" in text


def test_training_preparation_is_reported(llama_lora):
    from loadstone.demo import one_training_step

    result = loadstone.load(str(llama_lora), placement="cpu", gradient_checkpointing=True, progress=False)
    assert result.model.get_base_model().is_gradient_checkpointing
    assert "gradient checkpointing enabled (use_reentrant=False)" in result.report.training["notes"]
    step = one_training_step(result.model)
    assert step["all_gradients_on_adapter"] and not step["base_parameters_with_gradients"]


def test_the_placement_section_lists_each_devices_modules(sharded_llama):
    """Numbered runs fold (model.layers.0-1); every map entry on a device is named with its bytes."""
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.norm": "disk", "model.rotary_emb": "disk", "lm_head": "disk"}
    text = loadstone.plan(str(sharded_llama), placement=device_map).render()
    lines = {line.split()[0]: line for line in text.splitlines() if line.startswith("  ") and ":" in line}
    assert lines["cpu"].endswith(": model.embed_tokens, model.layers.0")
    assert lines["disk"].endswith(": model.layers.1, model.norm, model.rotary_emb, lm_head")
    everything = loadstone.plan(str(sharded_llama), placement="cpu").render()
    assert any(line.startswith("  cpu") and line.endswith(": (everything)") for line in everything.splitlines())


def test_compact_names_fold_numbered_runs():
    from loadstone.contract.report import compact_names

    names = ["model.embed_tokens", *(f"model.layers.{i}" for i in range(16)), "model.layers.18", "model.layers.19",
             "lm_head", "h.3"]
    assert compact_names(names) == "model.embed_tokens, model.layers.0-15, model.layers.18-19, lm_head, h.3"
    assert compact_names([f"m{i}" for i in range(10)], show=3) == "m0, m1, m2 ... (7 more)"
