"""Lifecycle hooks around a load: order, arguments, patching, vetoes, failures, an audit log."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import loadstone
from loadstone import hookimpl


class Recorder:
    """Records every lifecycle call with the arguments it got."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    @hookimpl
    def loadstone_before_load(self, request):
        self.calls.append(("before_load", {"request": request}))

    @hookimpl
    def loadstone_after_plan(self, plan, request):
        self.calls.append(("after_plan", {"plan": plan, "request": request}))

    @hookimpl
    def loadstone_model_loaded(self, model, plan, request):
        frozen = not any(p.requires_grad for p in model.parameters())
        self.calls.append(("model_loaded", {"model": model, "plan": plan, "request": request, "frozen": frozen}))

    @hookimpl
    def loadstone_after_load(self, result):
        self.calls.append(("after_load", {"result": result}))

    @hookimpl
    def loadstone_load_failed(self, request, stage, error):
        self.calls.append(("load_failed", {"request": request, "stage": stage, "error": error}))

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]


def manager(*plugins: Any) -> loadstone.PluginManager:
    return loadstone.PluginManager(allow=[], extra_plugins=[(f"p{i}", p) for i, p in enumerate(plugins)])


def test_hooks_run_in_order_with_the_right_arguments(llama_lora):
    recorder = Recorder()
    result = loadstone.load(str(llama_lora), placement="cpu", progress=False, plugins=manager(recorder))
    assert recorder.names() == ["before_load", "after_plan", "model_loaded", "after_load"]
    args = dict(recorder.calls)
    request = args["before_load"]["request"]
    assert isinstance(request, loadstone.LoadRequest) and request.placement == "cpu"
    assert args["after_plan"]["request"] is request and args["model_loaded"]["request"] is request
    assert args["after_plan"]["plan"] is result.plan and args["model_loaded"]["plan"] is result.plan
    assert args["after_load"]["result"] is result
    # model_loaded sees the base model before it is frozen and before peft wraps it
    base = args["model_loaded"]["model"]
    assert not args["model_loaded"]["frozen"]
    assert type(base).__name__ == "LlamaForCausalLM" and result.model.get_base_model() is base
    # ... and after_load sees the finished report
    assert result.report.parameters["trainable"] > 0 and "report" in result.report.stages


def test_plan_calls_before_load_and_after_plan_only(sharded_llama):
    recorder = Recorder()
    planned = loadstone.plan(str(sharded_llama), placement="cpu", plugins=manager(recorder))
    assert recorder.names() == ["before_load", "after_plan"]
    assert recorder.calls[1][1]["plan"] is planned


class ForceCpu:
    """An integration policy: this site never loads onto accelerators, and always pins bf16."""

    @hookimpl
    def loadstone_before_load(self, request):
        request.placement = "cpu"
        request.dtype = "bf16"  # an alias: the kernel must validate (normalise) the request again


def test_before_load_can_change_the_request(sharded_llama):
    result = loadstone.load(str(sharded_llama), placement="cuda:3", progress=False, plugins=manager(ForceCpu()))
    assert result.plan.device_map == {"": "cpu"}
    assert result.report.request["placement"] == "cpu" and result.report.dtype == "bfloat16"
    assert {p.dtype for p in result.model.parameters()} == {__import__("torch").bfloat16}
    # the report says which plugin changed which field, from what
    changed = result.report.decision("request.placement")
    assert changed.choice == "cpu" and changed.plugin == "p0" and "'cuda:3'" in changed.reason
    assert result.report.decision("request.dtype").choice == "bfloat16"


class BadPatch:
    @hookimpl
    def loadstone_before_load(self, request):
        request.dtype = "float8"


def test_a_request_broken_by_a_hook_is_validated_again(sharded_llama):
    recorder = Recorder()
    with pytest.raises(loadstone.OptionError, match="float8"):
        loadstone.load(str(sharded_llama), progress=False, plugins=manager(BadPatch(), recorder))
    assert recorder.names()[-1] == "load_failed" and recorder.calls[-1][1]["stage"] == "before_load"


class Veto:
    @hookimpl
    def loadstone_after_plan(self, plan):
        if "disk" in plan.bytes_per_device:
            raise loadstone.PlacementError("site policy: no disk offload", field="placement",
                                           fix="ask for more memory")


def test_after_plan_can_veto_before_any_weight_is_read(sharded_llama, tmp_path):
    recorder = Recorder()
    with pytest.raises(loadstone.PluginHookError) as info:
        loadstone.load(str(sharded_llama), max_memory={"cpu": 300_000}, offload_folder=str(tmp_path),
                       progress=False, plugins=manager(Veto(), recorder))
    err = info.value
    assert "site policy: no disk offload" in str(err) and err.plugin == "p0" and err.stage == "plan"
    assert err.distribution == "<in-process>" and err.fix == "ask for more memory"
    assert "model_loaded" not in recorder.names()
    assert recorder.calls[-1][1]["stage"] == "plan" and recorder.calls[-1][1]["error"] is err


class Crashes:
    @hookimpl
    def loadstone_model_loaded(self, model):
        raise KeyError("patched module missing")


def test_a_crashing_hook_names_its_plugin_and_stage(sharded_llama):
    recorder = Recorder()
    with pytest.raises(loadstone.PluginHookError) as info:
        loadstone.load(str(sharded_llama), placement="cpu", progress=False, plugins=manager(Crashes(), recorder))
    assert info.value.plugin == "p0" and info.value.stage == "load_weights"
    assert "KeyError" in str(info.value) and "LOADSTONE_DISABLE_PLUGINS=p0" in str(info.value)
    assert isinstance(info.value.__cause__, KeyError)
    assert recorder.names()[-1] == "load_failed" and recorder.calls[-1][1]["error"] is info.value


class FailsWhileFailing:
    @hookimpl
    def loadstone_load_failed(self, error):
        raise RuntimeError("the failure hook itself fails")


def test_load_failed_gets_the_real_error_and_its_own_failure_is_ignored(sharded_llama, tmp_path, caplog):
    recorder = Recorder()
    with pytest.raises(loadstone.ResolutionError) as info:
        loadstone.load(str(tmp_path / "nowhere"), progress=False,
                       plugins=manager(FailsWhileFailing(), recorder))
    name, args = recorder.calls[-1]
    assert name == "load_failed" and args["stage"] == "resolve" and args["error"] is info.value
    assert "the failure hook itself fails" in caplog.text


class AuditLog:
    """The audit-log integration the hook docs describe: one JSON line per load, success or not."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _write(self, entry: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry) + "\n")

    @hookimpl
    def loadstone_after_load(self, result):
        self._write({"event": "loaded", "report": result.report.to_dict()})

    @hookimpl
    def loadstone_load_failed(self, request, stage, error):
        self._write({"event": "failed", "reference": request.reference, "stage": stage,
                     "error": error.to_dict() if isinstance(error, loadstone.LoadstoneError) else repr(error)})


def test_audit_log_plugin(llama_lora, sharded_llama, tmp_path):
    log = tmp_path / "audit.jsonl"
    plugins = manager(AuditLog(log))
    loadstone.load(str(llama_lora), placement="cpu", progress=False, plugins=plugins)
    with pytest.raises(loadstone.PlacementError):
        loadstone.load(str(sharded_llama), placement="cpu", max_memory={"cpu": "1KB"}, progress=False,
                       plugins=plugins)
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    assert [e["event"] for e in entries] == ["loaded", "failed"]
    loaded = entries[0]["report"]
    assert loaded["sources"]["adapters"][0]["name"] == "default"
    assert {d["topic"] for d in loaded["decisions"]} >= {"source", "base", "task", "dtype", "quantization",
                                                         "placement", "engine"}
    failed = entries[1]
    assert failed["stage"] == "plan" and failed["reference"] == str(sharded_llama)
    assert failed["error"]["error"] == "PlacementError" and "max_memory" in failed["error"]["fix"]
