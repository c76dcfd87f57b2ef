"""Checkpoints quantized by gptqmodel (through loadstone_gptq.quantize and its command line) load
back: weights equal an independent dequantization of the stored tensors, logits equal the model
those weights describe and stay close to the original, and the plan's estimate holds."""

from __future__ import annotations

import json

import pytest
import torch
from gptq_reference import dequantize, write_plain_twin
from gptq_support import CALIBRATION, cpu_settings, layer_weight
from safetensors.torch import load_file

import loadstone
from loadstone_gptq import measured_bytes, quantize
from loadstone_gptq.cli import main

VARIANTS = {"4bit-g32": {}, "4bit-actorder-asym-v2": {"desc_act": True, "sym": False, "checkpoint_format": "gptq_v2"},
            "8bit-column": {"bits": 8, "group_size": -1}}


def stored_weights(folder) -> dict[str, torch.Tensor]:
    """Every quantized layer's exact float32 weight, decoded by gptq_reference from the files."""
    state = load_file(str(folder / "model.safetensors"))
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    v1 = config["checkpoint_format"] == "gptq"
    return {key[: -len(".qweight")]: dequantize(state[key], state[key.replace("qweight", "qzeros")],
                                                state[key.replace("qweight", "scales")],
                                                state[key.replace("qweight", "g_idx")], config["bits"], v1)
            for key in state if key.endswith(".qweight")}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_gptqmodel_checkpoint_loads_back_exactly(gptqmodel_checkpoint, source_model, loaded, input_ids, tmp_path,
                                                 variant):
    folder = gptqmodel_checkpoint(**VARIANTS[variant])
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert (folder / "quantize_config.json").is_file() and config["quant_method"] == "gptq"
    result = loaded(folder, dtype="float32")
    weights = stored_weights(folder)
    assert len(weights) == 14
    for layer, exact in weights.items():
        assert torch.equal(layer_weight(result.model.get_submodule(layer)), exact.half().float()), layer
    twin = loaded(write_plain_twin(folder, tmp_path / "twin", {k: w.half() for k, w in weights.items()}),
                  dtype="float32").model
    original = loaded(source_model, dtype="float32").model
    with torch.no_grad():
        got, same, before = (m(input_ids).logits for m in (result.model, twin, original))
    assert torch.allclose(got, same, rtol=0, atol=1e-5), (got - same).abs().max()
    # GPTQ's own error against the unquantized model: measured 0.04-0.11 relative L2 on this random model.
    tolerance = {"8bit-column": 0.02}.get(variant, 0.2)
    assert ((got - before).norm() / before.norm()).item() < tolerance


@pytest.mark.parametrize("trainable", [False, True])
def test_plan_estimate_within_five_percent(gptqmodel_checkpoint, trainable):
    folder = gptqmodel_checkpoint()
    with cpu_settings():
        result = loadstone.load(str(folder), placement="cpu", trainable=trainable, progress=False)
    real = measured_bytes(result.model)
    estimate = result.report.placement["estimated_bytes"]
    assert abs(estimate - real) <= 0.05 * real, (estimate, real)


def test_progress_reports_each_decoder_layer(source_model, tmp_path):
    seen = []
    out = quantize(source_model, tmp_path / "q", CALIBRATION[:8], bits=4, group_size=64,
                   progress=lambda done, total: seen.append((done, total)))
    assert seen == [(1, 2), (2, 2)]
    assert loadstone.plan(str(out), placement="cpu").report.quantization["settings"]["group_size"] == 64


def test_token_ids_calibrate_too_and_logs_stay_in_the_output(source_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ids = [list(range(3 + i, 40 + i)) for i in range(6)]
    out = quantize(source_model, tmp_path / "q", ids, group_size=32, progress=False)
    assert loadstone.plan(str(out), placement="cpu").report.decision("quantization").choice == "gptq"
    assert not (tmp_path / "logs").exists() and any((out / "logs").iterdir())  # gptqmodel's, not in the cwd


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"bits": 5}, "bits"), ({"group_size": 0}, "group_size"), ({"checkpoint_format": "marlin"}, "checkpoint_format"),
    ({"calibration": []}, "calibration"), ({"batch_size": 0}, "batch_size")])
def test_bad_arguments(source_model, tmp_path, kwargs, field):
    kwargs = {"calibration": CALIBRATION, **kwargs}
    with pytest.raises(loadstone.OptionError) as info:
        quantize(source_model, tmp_path / "q", kwargs.pop("calibration"), progress=False, **kwargs)
    assert info.value.field == field and info.value.fix


def test_a_folder_without_tokenizer_or_config(tiny_checkpoint, tmp_path):
    with pytest.raises(loadstone.QuantizationError) as info:
        quantize(tiny_checkpoint("llama"), tmp_path / "q", CALIBRATION, progress=False)
    assert info.value.field == "tokenizer" and "save_word_tokenizer" in info.value.fix
    with pytest.raises(loadstone.ConfigError, match="no config.json"):
        quantize(tmp_path, tmp_path / "q", CALIBRATION, progress=False)


def test_command_line(source_model, tmp_path, capsys):
    texts = tmp_path / "calibration.txt"
    texts.write_text("\n".join(CALIBRATION[:8]) + "\n\n")
    out = tmp_path / "cli-out"
    code = main(["quantize", str(source_model), str(out), "--calibration", str(texts), "--group-size", "32",
                 "--desc-act", "--quiet"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["output"] == str(out) and summary["settings"]["desc_act"] is True
    assert loadstone.plan(str(out), placement="cpu").report.quantization["settings"]["desc_act"] is True
    assert main(["quantize", str(source_model), str(out), "--calibration", str(tmp_path / "none.txt")]) == 2
    assert "calibration" in capsys.readouterr().err
