"""``placement="file:PATH"``: YAML and JSON rule files, checked against the model, and loads that
use exactly the planned map through both engines."""

from __future__ import annotations

import json

import pytest
import torch

import loadstone

LLAMA_MAP = """\
# the tiny Llama has two decoder layers
model.embed_tokens: cpu
model.layers.[0-1]: cpu
model.norm: cpu
model.rotary_emb: cpu
lm_head: cpu
"""


def state(model):
    from accelerate.utils.modeling import get_state_dict_offloaded_model

    return {k: v.detach().cpu() for k, v in get_state_dict_offloaded_model(model).items()}


@pytest.fixture(scope="module")
def llama(tiny_checkpoint):
    return tiny_checkpoint("llama")


@pytest.fixture(scope="module")
def reference(llama):
    return state(loadstone.load(str(llama), placement="cpu", progress=False, trainable=False).model)


def test_yaml_and_json_give_the_same_map(llama, plugins, write_map):
    as_yaml = write_map(LLAMA_MAP)
    as_json = write_map(json.dumps({"model.embed_tokens": "cpu", "model.layers.[0-1]": "cpu", "model.norm": "cpu",
                                    "model.rotary_emb": "cpu", "lm_head": "cpu"}), ".json")
    a = loadstone.plan(str(llama), placement=f"file:{as_yaml}", plugins=plugins)
    b = loadstone.plan(str(llama), placement=f"file:{as_json}", plugins=plugins)
    assert a.device_map == b.device_map == {"": "cpu"}  # one device for everything: one entry
    decision = a.report.decision("placement")
    assert decision.by == "strategy file" and decision.distribution == "loadstone-devicemap"
    assert "5 rule(s)" in decision.reason


MIXED = """\
model.embed_tokens: cpu
model.layers.0: cpu
re:model\\.layers\\.1: disk
model.norm: cpu
model.rotary_emb: cpu
lm_head: disk
"""


@pytest.mark.parametrize("engine", ["loadstone", "transformers"])
def test_the_load_uses_exactly_the_planned_map(llama, reference, plugins, write_map, engine):
    rules = write_map(LLAMA_MAP.replace("model.layers.[0-1]: cpu", "model.layers.0: cpu\nmodel.layers.1: cpu"))
    planned = loadstone.plan(str(llama), placement=f"file:{rules}", plugins=plugins, engine=engine)
    result = loadstone.load(str(llama), placement=f"file:{rules}", plugins=plugins, engine=engine, progress=False,
                            trainable=False)
    assert result.plan.device_map == planned.device_map
    assert result.report.engine["name"] == engine
    loaded = state(result.model)
    assert loaded.keys() == reference.keys()
    assert all(torch.equal(loaded[k], reference[k]) for k in reference)


def test_disk_entries_load_through_transformers_and_the_native_engine_refuses_them(llama, reference, plugins,
                                                                                     write_map, tmp_path):
    rules = write_map(MIXED)
    folder = tmp_path / "offload"
    planned = loadstone.plan(str(llama), placement=f"file:{rules}", plugins=plugins, offload_folder=str(folder))
    assert planned.device_map == {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "disk"}
    assert planned.engine.name == "transformers" and "disk" in " ".join(planned.engine_problems["loadstone"])
    result = loadstone.load(str(llama), placement=f"file:{rules}", plugins=plugins, offload_folder=str(folder),
                            progress=False, trainable=False)
    assert result.plan.device_map == planned.device_map
    assert result.model.lm_head.weight.device.type == "meta"  # served from disk by accelerate's hook
    loaded = state(result.model)
    assert all(torch.equal(loaded[k], reference[k]) for k in reference)
    with pytest.raises(loadstone.EngineError, match="does not offload to disk"):
        loadstone.plan(str(llama), placement=f"file:{rules}", plugins=plugins, offload_folder=str(folder),
                       engine="loadstone")


def test_a_map_for_gpus_plans_on_a_cpu_machine_and_refuses_to_load(llama, plugins, write_map):
    rules = write_map("model.embed_tokens: cuda:0\nmodel.layers.0: 0\nmodel.layers.1: cuda:1\n"
                      "model.norm: cuda:1\nmodel.rotary_emb: cuda:1\nlm_head: '1'\n")
    planned = loadstone.plan(str(llama), placement=f"file:{rules}", plugins=plugins)
    assert planned.device_map == {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 1,
                                  "model.norm": 1, "model.rotary_emb": 1, "lm_head": 1}
    assert set(planned.bytes_per_device) == {"cuda:0", "cuda:1"}
    if torch.cuda.device_count() < 2:
        assert any("does not have" in note for note in planned.report.notes)
        with pytest.raises(loadstone.PlacementError, match="does not have"):
            loadstone.load(str(llama), placement=f"file:{rules}", plugins=plugins, progress=False)


def test_tied_weights_follow_the_rule_that_places_one_of_them(tiny_checkpoint, plugins, write_map):
    gpt2 = tiny_checkpoint("gpt2")
    rules = write_map("transformer.wte: cpu\ntransformer.wpe: cpu\ntransformer.h.[0-1]: cpu\ntransformer.ln_f: cpu\n")
    planned = loadstone.plan(str(gpt2), placement=f"file:{rules}", plugins=plugins)
    assert planned.device_map == {"": "cpu"}
    result = loadstone.load(str(gpt2), placement=f"file:{rules}", plugins=plugins, progress=False)
    assert result.model.lm_head.weight is result.model.transformer.wte.weight


def test_tied_weights_on_two_devices_are_refused(tiny_checkpoint, plugins, write_map):
    gpt2 = tiny_checkpoint("gpt2")
    rules = write_map("transformer.wte: cpu\ntransformer.wpe: cpu\ntransformer.h.[0-1]: cpu\n"
                      "transformer.ln_f: cpu\nlm_head: disk\n")
    with pytest.raises(loadstone.PlacementError) as info:
        loadstone.plan(str(gpt2), placement=f"file:{rules}", plugins=plugins)
    text = str(info.value)
    assert "tied weights" in text and "lm_head.weight -> disk" in text and "transformer.wte.weight -> cpu" in text
    assert rules.name in text  # the rule that placed it, with its line


@pytest.mark.parametrize(("text", "problem", "listed"), [
    # every unknown name at once, with the closest real one
    ("model.embed_tokens: cpu\nmodel.layer.[0-1]: cpu\nmodel.nrom: cpu\nmodel.rotary_emb: cpu\nlm_head: cpu\n",
     "2 device-map rule(s) match no module", ["'model.layer.[0-1]'", "did you mean model.norm", "line 3"]),
    # overlapping rules name both and what they both claim
    (LLAMA_MAP + "model.layers.1.mlp: cpu\n", "rules overlap",
     ["'model.layers.[0-1]' -> cpu", "'model.layers.1.mlp' -> cpu", "line 7", "model.layers.1.mlp.down_proj"]),
    ("'': cpu\nlm_head: cpu\n", "rules overlap", ["'' -> cpu", "'lm_head' -> cpu", "lm_head (1 tensors)"]),
    # unplaced tensors, buffers-only modules named as such
    ("model.embed_tokens: cpu\nmodel.layers.0: cpu\nlm_head: cpu\n", "leaves 12 tensor(s) unplaced: model.layers.1, "
     "model.norm, model.rotary_emb (model.rotary_emb hold only buffers", ["model.layers.1: cpu; model.norm: cpu"]),
    # a decoder layer over two devices
    (LLAMA_MAP.replace("model.layers.[0-1]: cpu", "model.layers.0: cpu\nmodel.layers.1.mlp: disk\n"
                       "model.layers.1.self_attn: cpu\nmodel.layers.1.input_layernorm: cpu\n"
                       "model.layers.1.post_attention_layernorm: cpu"),
     "splits 1 decoder layer(s)", ["model.layers.1 (cpu, disk)"]),
])
def test_bad_maps_list_every_problem(llama, plugins, write_map, text, problem, listed):
    path = write_map(text)
    with pytest.raises(loadstone.PlacementError) as info:
        loadstone.plan(str(llama), placement=f"file:{path}", plugins=plugins)
    message = str(info.value)
    assert problem in message, message
    for part in listed:
        assert part in message, (part, message)
    assert info.value.fix and info.value.file == str(path)


@pytest.mark.parametrize(("text", "suffix", "problem"), [
    ("model.norm: cpu\nmodel.norm: disk\n", ".yaml", "has the key 'model.norm' twice (lines 1 and 2)"),
    ('{"model.norm": "cpu",\n "model.norm": "disk"}', ".json", "has the key 'model.norm' twice (lines 1 and 2)"),
    ("- model.norm\n- lm_head\n", ".yaml", "is not a mapping"),
    ("model:\n  norm: cpu\n", ".yaml", "is not a mapping"),
    ('["model.norm"]', ".json", "is not a mapping"),
    ('{"model": {"norm": "cpu"}}', ".json", "is not a mapping"),
    ("model.norm: [cpu\n", ".yaml", "is not valid YAML"),
    ('{"model.norm": cpu}', ".json", "is not valid JSON"),
    ("", ".yaml", "places nothing"),
    ("{}", ".json", "places nothing"),
    ("model.norm: cpu\n", ".toml", "not a device-map file"),
    ("model.norm: yes\n", ".yaml", "not a device"),
    ("7: cpu\n", ".yaml", "not a name"),
])
def test_malformed_files_are_clear_errors(llama, plugins, write_map, text, suffix, problem):
    path = write_map(text, suffix)
    with pytest.raises(loadstone.PlacementError) as info:
        loadstone.plan(str(llama), placement=f"file:{path}", plugins=plugins)
    assert problem in str(info.value), str(info.value)
    assert info.value.file is not None and info.value.fix


def test_missing_file_and_missing_path(llama, plugins, tmp_path):
    with pytest.raises(loadstone.PlacementError, match="does not exist"):
        loadstone.plan(str(llama), placement=f"file:{tmp_path / 'nope.yaml'}", plugins=plugins)
    with pytest.raises(loadstone.PlacementError, match="needs the path"):
        loadstone.plan(str(llama), placement="file", plugins=plugins)


def test_without_the_plugin_the_error_names_the_distribution(llama, monkeypatch):
    monkeypatch.setenv("LOADSTONE_PLUGINS", "")  # built-ins only
    for spec in ("file:map.yaml", "even", "layers:2", "fsdp"):
        with pytest.raises(loadstone.ComponentNotFoundError) as info:
            loadstone.plan(str(llama), placement=spec, plugins=loadstone.PluginManager())
        assert "loadstone-devicemap" in info.value.fix, spec  # installed here, so: "... is installed but disabled"


def test_a_module_split_between_its_weight_and_bias_is_refused(tiny_checkpoint, plugins, write_map):
    qwen2 = tiny_checkpoint("qwen2")  # its attention projections have biases
    layer0 = ["self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp", "input_layernorm",
              "post_attention_layernorm", "self_attn.q_proj.weight"]
    rules = write_map("model.embed_tokens: cpu\nmodel.layers.1: cpu\nmodel.norm: cpu\nmodel.rotary_emb: cpu\n"
                      "lm_head: cpu\n" + "".join(f"model.layers.0.{m}: cpu\n" for m in layer0)
                      + "model.layers.0.self_attn.q_proj.bias: disk\n")
    with pytest.raises(loadstone.PlacementError) as info:
        loadstone.plan(str(qwen2), placement=f"file:{rules}", plugins=plugins)
    assert "splits the tensors of 1 module(s)" in str(info.value)
    assert "model.layers.0.self_attn.q_proj (cpu, disk)" in str(info.value)
