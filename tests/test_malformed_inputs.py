"""Malformed input beyond the corpus (issue 7, section 2): what must still load (shards spelled
``./name``, a weights file of another name, every kind of valid adapter), the bounds on cost
(layer counts against the headers, a module budget, module-name patterns), unreadable files,
and option JSON given to the command line or the Python API."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import loadstone
from loadstone import AdapterError, ConfigError, LoadstoneError, OptionError
from loadstone.cli import main

sys.path.insert(0, str(Path(__file__).parent))
import corpus  # noqa: E402

INDEX = "model.safetensors.index.json"


# ----------------------------------------------------------------------------- what must load


@pytest.mark.parametrize("engine", ["loadstone", "transformers"])
def test_index_spelling_shards_with_dot_slash_loads(sharded_llama, tmp_path, engine, same_weights, reference_model):
    folder = tmp_path / "dotted"
    shutil.copytree(sharded_llama, folder)
    names = sorted(json.loads((folder / INDEX).read_text())["weight_map"])
    # Half the entries say ./shard, half shard: the same three files either way.
    corpus.edit_json(folder / INDEX, lambda d: d["weight_map"].update(
        {k: "./" + v for i, (k, v) in enumerate(sorted(d["weight_map"].items())) if i % 2}))
    assert any(v.startswith("./") for v in json.loads((folder / INDEX).read_text())["weight_map"].values())
    loaded = loadstone.load(str(folder), placement="cpu", progress=False, engine=engine)
    assert loaded.report.engine["name"] == engine and len(loaded.plan.inventory.files) == 3
    same_weights(loaded.model, reference_model(folder))  # transformers reads it too
    assert sorted(loaded.plan.inventory.tensors) == names


def test_weights_file_of_another_name_loads_with_the_native_engine(tiny_checkpoint, tmp_path, same_weights):
    source = tiny_checkpoint("llama")
    folder = tmp_path / "consolidated"
    shutil.copytree(source, folder)
    (folder / "model.safetensors").rename(folder / "consolidated.safetensors")
    planned = loadstone.plan(str(folder), placement="cpu")
    assert planned.engine.name == "loadstone"
    assert "consolidated.safetensors" in " ".join(planned.engine_problems["transformers"])
    loaded = loadstone.load(str(folder), placement="cpu", progress=False)
    same_weights(loaded.model, loadstone.load(str(source), placement="cpu", progress=False).model)


def _peft_configs():
    from peft import IA3Config, LoHaConfig, LoraConfig, PromptTuningConfig, VeraConfig

    return {
        "ia3": (IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"],
                          task_type="CAUSAL_LM"), True),
        "loha": (LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"), True),
        "vera": (VeraConfig(r=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"), True),
        "prompt": (PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"), False),
        "dora": (LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj"], task_type="CAUSAL_LM"), True),
        "patterns": (LoraConfig(r=4, lora_alpha=8, target_modules=r".*\.(q_proj|v_proj)", rank_pattern={"q_proj": 2},
                                alpha_pattern={r"layers\.1\..*v_proj": 3}, modules_to_save=["lm_head"],
                                task_type="CAUSAL_LM"), True),
    }


@pytest.mark.parametrize("kind", ["ia3", "loha", "vera", "prompt", "dora", "patterns"])
def test_valid_adapters_of_every_kind_plan_and_load(kind, tiny_checkpoint, tmp_path):
    """No false alarms from the adapter checks: real peft adapters of several kinds load."""
    import transformers
    from peft import get_peft_model

    base = tiny_checkpoint("llama")
    config, trainable = _peft_configs()[kind]
    peft_model = get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(str(base)), config)
    peft_model.save_pretrained(tmp_path / kind)
    corpus.edit_json(tmp_path / kind / "adapter_config.json", lambda c: c.update(base_model_name_or_path=str(base)))
    loadstone.plan(str(tmp_path / kind), placement="cpu", trainable=trainable)
    loaded = loadstone.load(str(tmp_path / kind), placement="cpu", progress=False, trainable=trainable)
    saved = set(__import__("safetensors.torch", fromlist=["load_file"]).load_file(
        tmp_path / kind / "adapter_model.safetensors"))
    assert saved and loaded.report.adapters[0]["peft_type"] == config.peft_type.value


def test_pickle_adapters_are_checked_like_safetensors_ones(tiny_adapter, tmp_path):
    """With allow_pickle, an adapter_model.bin gets the same checks (read onto the meta device); a
    damaged one is a CheckpointError, not torch's traceback."""
    import torch
    from safetensors.torch import load_file

    adapter = tmp_path / "adapter"
    shutil.copytree(tiny_adapter("llama"), adapter)
    tensors = load_file(adapter / "adapter_model.safetensors")
    (adapter / "adapter_model.safetensors").unlink()
    torch.save(tensors, adapter / "adapter_model.bin")
    assert loadstone.load(str(adapter), placement="cpu", progress=False, allow_pickle=True).report.adapters
    corpus.edit_json(adapter / "adapter_config.json", lambda c: c.update(r=8))
    with pytest.raises(AdapterError, match="r=8"):
        loadstone.plan(str(adapter), placement="cpu", allow_pickle=True)
    (adapter / "adapter_model.bin").write_bytes(b"PK\x03\x04 not a zip archive")
    with pytest.raises(loadstone.CheckpointError, match="not a readable PyTorch checkpoint"):
        loadstone.plan(str(adapter), placement="cpu", allow_pickle=True)


# ----------------------------------------------------------------------------- bounded cost


def test_module_budget_stops_a_config_far_larger_than_its_checkpoint():
    """The generic bound behind the layer check: building stops after max_modules modules."""
    from loadstone.contract.request import LoadRequest
    from loadstone.stages.plan.skeleton import SkeletonFactory
    from loadstone.testing import make_config
    from transformers import AutoModelForCausalLM

    config = make_config("llama", num_hidden_layers=10**6)  # the config object holds 10**6 layer types: fine
    factory = SkeletonFactory(AutoModelForCausalLM, config, "float32", LoadRequest("x"),
                              config_path=Path("config.json"), max_modules=500)
    started = time.monotonic()
    with pytest.raises(ConfigError, match="more than 500 modules") as info:
        factory.build()
    assert time.monotonic() - started < 10 and info.value.file == "config.json"


def test_plan_cost_is_bounded_by_the_checkpoint_not_the_config(tiny_checkpoint, tmp_path, python_subprocess):
    """10**9 layers: refused from the headers in a fresh process, without building anything (a
    config object alone with that many layers takes gigabytes)."""
    folder = tmp_path / "huge"
    shutil.copytree(tiny_checkpoint("llama"), folder)
    corpus.edit_json(folder / "config.json", lambda c: c.update(num_hidden_layers=10**9))
    code = ("import resource, sys\nfrom loadstone.cli import main\n"
            f"rc = main(['plan', {str(folder)!r}, '--placement', 'cpu'])\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\nsys.exit(rc)")
    started = time.monotonic()
    done = python_subprocess(code, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "1000000000 layers" in done.stderr and "num_hidden_layers" in done.stderr
    assert time.monotonic() - started < 60
    assert int(done.stdout.split()[-1]) < 2 * 2**20  # KiB: peak RSS under 2 GiB


ACCEPTED = [r".*\.(q_proj|v_proj)", r"model\.layers\.\d+\.self_attn\.(q|k|v)_proj",
            r"^(?!.*vision).*\.(q_proj|v_proj)$", r".*decoder.*(SelfAttention|EncDecAttention).*(q|v)$",
            r"(?:(?!mlp).)*q_proj", ".*.*.*.*X"]
REFUSED = {r"(a+)+$": "nests a repeat", r"(.*)*x": "nests a repeat", r"(a|aa)+$": "alternatives",
           r"(\w+\.)+q_proj": "nests a repeat", r"(q)\1": "backreference", ".*.*.*.*.*X": "5 repeats",
           "(q_proj": "not a valid regular expression"}


def _module_names(layers: int = 80) -> list[str]:
    parts = ["self_attn", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "mlp.act_fn", "input_layernorm",
             "post_attention_layernorm"]
    return [f"model.layers.{i}.{p}" for i in range(layers) for p in parts] + ["model.embed_tokens", "lm_head"]


@pytest.mark.parametrize("pattern", ACCEPTED)
def test_module_name_patterns_accepted_match_in_bounded_time(pattern):
    from loadstone.stages.adapter_config import check_pattern

    check_pattern(pattern, field="target_modules", path=Path("adapter_config.json"))
    started = time.monotonic()  # what peft will do: fullmatch against every module of an 80-layer model
    for name in _module_names():
        re.fullmatch(pattern, name)
    assert time.monotonic() - started < 10  # the worst accepted pattern: 0.06 s on an idle core


@pytest.mark.parametrize("pattern,why", REFUSED.items())
def test_module_name_patterns_that_may_backtrack_without_bound_are_refused(pattern, why):
    from loadstone.stages.adapter_config import check_pattern

    started = time.monotonic()
    with pytest.raises(AdapterError, match=re.escape(why)) as info:
        check_pattern(pattern, field="target_modules", path=Path("adapter_config.json"))
    assert time.monotonic() - started < 1 and info.value.field == "target_modules" and info.value.fix


# ----------------------------------------------------------------------------- unreadable files


def test_unreadable_files_are_refused_with_the_fix(tiny_checkpoint, tiny_adapter, tmp_path, python_subprocess):
    """Permission denied on config.json, a shard index and adapter_config.json. Root reads any file,
    so as root the check runs without the capabilities that allow it (setpriv)."""
    model = tmp_path / "model"
    shutil.copytree(tiny_checkpoint("llama", max_shard_size="200KB"), model)
    adapter = tmp_path / "adapter"
    shutil.copytree(tiny_adapter("llama"), adapter)
    corpus.edit_json(adapter / "adapter_config.json", lambda c: c.update(base_model_name_or_path=str(model)))
    cases = [(model / "config.json", str(model)), (model / INDEX, str(model)),
             (adapter / "adapter_config.json", str(model))]
    code = ("import json, os, sys\nimport loadstone\nout = []\n"
            "for path, ref, adapters in json.loads(sys.argv[1]):\n"
            "    os.chmod(path, 0)\n"
            "    try:\n"
            "        loadstone.plan(ref, placement='cpu', adapters=adapters)\n"
            "        out.append(None)\n"
            "    except loadstone.LoadstoneError as e:\n"
            "        out.append(e.to_dict())\n"
            "    os.chmod(path, 0o644)\n"
            "print(json.dumps(out))")
    args = [[str(path), ref, [str(adapter)] if path.parent == adapter else []] for path, ref in cases]
    command = [sys.executable, "-c", code, json.dumps(args)]
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv: cannot make a file unreadable to this process")
        command = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *command]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout.splitlines()[-1])
    for (path, _), result in zip(cases, results):
        assert result is not None, f"{path.name} was read"
        assert result["file"] == str(path) and "Permission denied" in result["message"], result
        assert "chmod" in result["fix"], result


# ----------------------------------------------------------------------------- option JSON


def _cli(capsys, *argv: str) -> tuple[int, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, err


@pytest.mark.parametrize("content,error,mentions", [
    ("[1, 2]", "OptionError", "JSON object"),
    ('"cpu"', "OptionError", "JSON object"),
    ('{"": NaN}', "OptionError", "not finite"),
    ('{"": "cpu", "": "disk"}', "OptionError", "twice"),
    ("[" * 5000 + "]" * 5000, "OptionError", "nested"),
    ("{}", "OptionError", "empty"),
    ('{"": "meta"}', "OptionError", "'meta'"),
    ('{"": -1}', "OptionError", "-1 (int)"),
    ('{"": true}', "OptionError", "True (bool)"),
    ('{"": 1.5}', "OptionError", "1.5 (float)"),
    ('{"": {"device": 0}}', "OptionError", "(dict)"),
    ('{"": "gpu7"}', "OptionError", "gpu7"),
    ('{"model.nope": "cpu", "": "cpu"}', "PlacementError", "model.nope"),
])
def test_device_map_json_is_refused_in_one_paragraph(content, error, mentions, capsys, sharded_llama, tmp_path):
    path = tmp_path / "map.json"
    path.write_text(content)
    code, err = _cli(capsys, "plan", str(sharded_llama), "--device-map", str(path))
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"error ({error})") and mentions in lines[0], lines[0]


def test_nested_device_map_entries_load(sharded_llama, tmp_path, placed_as):
    """The longest prefix wins: everything on the CPU but the layers, which go to disk."""
    spec = {"": "cpu", "model.layers": "disk"}
    loaded = loadstone.load(str(sharded_llama), placement=spec, offload_folder=str(tmp_path / "off"), progress=False)
    placed_as(loaded.model, {"model.layers": "disk", "": "cpu"})
    assert all(not (a != b and b.startswith(a + ".")) for a in loaded.plan.device_map for b in loaded.plan.device_map)


@pytest.mark.parametrize("value,mentions", [
    ("[" * 5000 + "]" * 5000, "nested"), ("NaN", "finite"), ("1e999", "finite"),
    ('{"a": 1, "a": 2}', "twice")])
def test_quantization_option_json_is_refused_in_one_paragraph(value, mentions, capsys, sharded_llama):
    code, err = _cli(capsys, "plan", str(sharded_llama), "-o", f"double_quant={value}")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error (OptionError)") and mentions in lines[0]


def test_control_characters_in_an_error_are_shown_escaped(capsys, sharded_llama):
    """A value from a hostile file or argument may hold terminal escapes or a record separator:
    the paragraph stays one line and sends none of them to the terminal."""
    code, err = _cli(capsys, "plan", str(sharded_llama), "-e", "chunk_bytes=1\x1e\x1b[2J")
    assert code == 2 and len(err.splitlines()) == 1 and "\\x1e\\x1b[2J" in err
    assert not any(c in err for c in "\x1e\x1b\r"), err


@pytest.mark.parametrize("kwargs,field", [
    ({"revision": {"branch": "main"}}, "revision"), ({"base": ["x"]}, "base"), ({"cache_dir": 5}, "cache_dir"),
    ({"trust_remote_code": "false"}, "trust_remote_code"), ({"trainable": "no"}, "trainable"),
    ({"adapters": {"a": 5}}, "adapters['a']"),
    ({"placement": {"": None}}, "placement['']"), ({"placement": {0: "cpu"}}, "placement"),
    ({"placement": {}}, "placement")])
def test_python_api_options_of_the_wrong_type_are_refused(kwargs, field, sharded_llama):
    with pytest.raises(OptionError) as info:
        loadstone.plan(str(sharded_llama), **kwargs)
    assert info.value.field == field and info.value.fix and isinstance(info.value, LoadstoneError)


# ----------------------------------------------------------------------------- no false alarms


def test_every_default_transformers_config_passes_the_value_checks():
    """The config checks refuse only what no model can be built from: the defaults of every config
    class transformers ships (Swin's per-stage head lists, Lxmert's per-tower layer counts,
    sentinels such as -1) pass."""
    import warnings

    from transformers import CONFIG_MAPPING

    from loadstone.stages.inspect.config_values import check_config_values

    checked, refused = 0, []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for model_type in sorted(CONFIG_MAPPING.keys()):
            try:
                config_class = CONFIG_MAPPING[model_type]
                raw = json.loads(json.dumps(config_class().to_dict()))
            except Exception:  # noqa: BLE001 - a config class that needs an optional dependency
                continue
            checked += 1
            try:
                check_config_values(raw, Path("config.json"), config_class, None)
            except LoadstoneError as error:
                refused.append(f"{model_type}: {error.message}")
    assert checked > 300 and not refused, refused
