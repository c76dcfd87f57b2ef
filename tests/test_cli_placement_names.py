"""Built-in placement strategies' own names given as ``-p`` ("device", "explicit") are refused with
a PlacementError that says what to pass, not a traceback; the planner counts only accelerators;
``-o`` without ``-q`` says that backend options go with a quantization method; and a key given
twice to a repeatable option is refused."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from loadstone.builtin.placement import DevicePlacement
from loadstone.cli import main
from loadstone.stages.plan import memory


def _run(capsys, *argv: str) -> tuple[int, dict]:
    code = main([*argv, "--json", "--quiet"])
    out, err = capsys.readouterr()
    return code, json.loads(out)


@pytest.mark.parametrize("command", ["plan", "load"])
@pytest.mark.parametrize("spec, says", [("device", "cuda:0"), ("explicit", "--device-map")])
def test_a_strategy_name_that_is_no_placement_is_a_placement_error(command, spec, says, sharded_llama, capsys):
    code, error = _run(capsys, command, str(sharded_llama), "-p", spec)
    assert code == 2
    assert error["error"] == "PlacementError" and error["field"] == "placement" and error["found"] == spec
    assert says in error["fix"]


def test_the_device_strategy_names_no_device_for_its_own_name():
    strategy = DevicePlacement()
    assert strategy.whole_model_device("device") is None  # nothing may be read ahead onto "device"
    assert strategy.whole_model_device("cuda:1") == 1


@pytest.mark.parametrize("kind", ["device", "cpu", "meta", "disk", "float32", "Tensor"])
def test_only_accelerator_kinds_are_counted(kind):
    assert memory._accelerator_count(kind) == 0
    if kind not in ("cpu", "meta", "disk"):
        assert memory.missing_devices([kind]) == [kind]


def test_an_accelerator_module_without_device_count_counts_none(monkeypatch):
    import torch

    monkeypatch.setattr(torch, "xpu", SimpleNamespace(is_available=lambda: True), raising=False)
    assert memory._accelerator_count("xpu") == 0
    monkeypatch.setattr(torch, "xpu", SimpleNamespace(is_available=lambda: True, device_count=lambda: 2),
                        raising=False)
    assert memory._accelerator_count("xpu") == 2
    assert memory.missing_devices(["xpu:1", "xpu:2"]) == ["xpu:2"]


def test_quant_options_without_a_method_say_to_add_one(sharded_llama, capsys):
    code, error = _run(capsys, "plan", str(sharded_llama), "-o", "double_quant=true")
    assert code == 2 and error["field"] == "-o/--quant-option" and "-q METHOD" in error["fix"]
    # with -q none asked for explicitly, the backend's own refusal stands
    code, error = _run(capsys, "plan", str(sharded_llama), "-q", "none", "-o", "double_quant=true")
    assert code == 2 and error["field"] == "quantization options"


@pytest.mark.parametrize("first, second", [("--max-memory", "cpu=1GiB"), ("-e", "readers=2"),
                                           ("-o", "double_quant=true")])
def test_a_key_given_twice_to_a_repeatable_option_is_refused_not_overwritten(first, second, sharded_llama, capsys):
    key = second.partition("=")[0]
    code, error = _run(capsys, "plan", str(sharded_llama), first, second, first, f"{key}=3")
    assert code == 2 and error["error"] == "OptionError" and error["field"] == f"{first} {key}"


@pytest.mark.parametrize("make", ["missing", "directory"])
def test_a_device_map_file_that_cannot_be_read_names_the_option(make, sharded_llama, tmp_path, capsys):
    path = tmp_path / "map.json"
    if make == "directory":
        path.mkdir()
    code, error = _run(capsys, "plan", str(sharded_llama), "--device-map", str(path))
    assert code == 2 and error["field"] == "--device-map" and error["file"] == str(path)


def test_an_interrupted_command_under_json_prints_an_error_object_with_every_key(sharded_llama, capsys,
                                                                                 monkeypatch):
    import loadstone.cli as cli

    code, refused = _run(capsys, "plan", str(sharded_llama), "-p", "device")  # any refusal: its keys

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_cmd_load_or_plan", interrupted)
    code, error = _run(capsys, "plan", str(sharded_llama))
    assert code == 130 and error["error"] == "interrupted" and error["exit_code"] == 130
    assert set(error) == set(refused)
