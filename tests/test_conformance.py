"""The conformance kit run against loadstone's own built-in components (registered exactly like
third-party ones): each check of each kit passes, and its measurements say what was compared.

The built-in engine's kit is the engine half of the load matrix: every tiny architecture in
bfloat16 and float32, loaded by the native engine, equals the transformers engine bit for bit.
"""

from __future__ import annotations

import pytest

import loadstone
from loadstone.testing import ARCHITECTURES, conformance, make_hub_cache


@pytest.fixture(scope="module")
def builtins_only():
    """Built-in plugins only: what is checked does not depend on what else is installed."""
    return loadstone.PluginManager(allow=[], disable=[])


@pytest.mark.parametrize("check", list(conformance.BACKEND_CHECKS))
def test_builtin_backend_none(loadstone_conformance, builtins_only, check):
    report = loadstone_conformance.backend("none", plugins=builtins_only, distribution="loadstone", only=[check])
    report.assert_ok()
    assert report[check].passed, report.render()
    if check == "engines_agree":
        assert report[check].measured["engines"] == ["loadstone", "transformers"]
    if check == "peak":
        # Nothing is converted: every tensor handed over becomes the model's storage, nothing is in flight.
        assert all(case["planned_in_flight"] == 0 and case["conversion_in_flight"] == 0 and case["conversions"] > 20
                   for case in report[check].measured["cases"]), report[check].measured


@pytest.mark.parametrize("check", list(conformance.ENGINE_CHECKS))
def test_builtin_native_engine(loadstone_conformance, builtins_only, check):
    report = loadstone_conformance.engine("loadstone", plugins=builtins_only, distribution="loadstone", only=[check])
    report.assert_ok()
    assert report[check].passed, report.render()
    measured = report[check].measured
    if check == "equal_to_reference":
        assert measured["models_compared"] == len(ARCHITECTURES) * 2  # bfloat16 and float32
    if check == "refusals":  # the native engine neither offloads to disk nor reads pickle
        assert set(measured["cases"]) == {"disk offload", "pickle weights"}
        assert all("refused" in outcome for outcome in measured["cases"].values()), measured


def test_builtin_transformers_engine_runs_what_the_native_one_refuses(loadstone_conformance, builtins_only):
    report = loadstone_conformance.engine("transformers", plugins=builtins_only, reference="loadstone",
                                          architectures=["llama", "gpt2"], skip=["listing"])
    report.assert_ok()
    assert report["refusals"].measured["cases"] == {"disk offload": "accepted", "pickle weights": "accepted"}


@pytest.mark.parametrize("spec,kwargs", [
    ("cpu", {}),
    ("rank", {}),
    ("auto", {}),
    ("sequential", {"load_kwargs": {"max_memory": {"cpu": "600KB"}}, "offload": True}),
], ids=["cpu", "rank", "auto", "sequential-with-disk"])
def test_builtin_placements(loadstone_conformance, builtins_only, spec, kwargs):
    report = loadstone_conformance.placement(spec, plugins=builtins_only, distribution="loadstone", **kwargs)
    report.assert_ok()
    assert all(r.passed for r in report.results if r.name != "whole_model_device"), report.render()
    assert report["tied_together"].measured["tied_pairs_checked"] >= 1  # GPT-2's lm_head and wte
    # cpu and rank (on a machine without CUDA, or rank 0 of one with) name their device before planning
    promise = report["whole_model_device"]
    assert promise.status == ("passed" if spec in ("cpu", "rank") else "skipped"), report.render()


def test_sequential_placement_with_a_budget_really_spills_to_disk(loadstone_conformance, builtins_only):
    report = loadstone_conformance.placement("sequential", plugins=builtins_only, offload=True,
                                             load_kwargs={"max_memory": {"cpu": "600KB"}},
                                             only=["every_tensor_placed"])
    maps = report["every_tensor_placed"].measured["maps"]
    assert any("disk" in m.values() for m in maps.values()), maps  # the check saw a real offload


def test_builtin_local_resolver(loadstone_conformance, builtins_only, tiny_checkpoint, tmp_path):
    local = ["org/model", "org/model@main", "s3://bucket/model", "https://example.com/model.tar", "hf://org/model"]
    report = loadstone_conformance.resolver(
        "local", plugins=builtins_only, distribution="loadstone", foreign=local,
        own=[str(tiny_checkpoint("llama"))], broken=[str(tmp_path / "missing"), "./not-here"])
    report.assert_ok()
    assert all(r.passed for r in report.results), report.render()


def test_builtin_hub_resolver_offline(loadstone_conformance, builtins_only, tiny_checkpoint, tmp_path):
    cache = tmp_path / "hub"
    make_hub_cache(cache, "org/tiny", tiny_checkpoint("llama"))
    report = loadstone_conformance.resolver(
        "hub", plugins=builtins_only, context={"cache_dir": str(cache), "offline": True},
        foreign=["./models/not-here", "/nonexistent/model/folder", "s3://bucket/model", "catalog://tiny"],
        own=["org/tiny", "org/tiny@main"], broken=["org/not-cached", "org/tiny@v9"], skip=["listing"])
    report.assert_ok()
    assert all(r.passed for r in report.results), report.render()
    assert "not in the local Hugging Face cache" in report["broken_references"].measured["errors"]["org/not-cached"]


def test_report_serialises_and_renders(loadstone_conformance, builtins_only):
    report = loadstone_conformance.backend("none", plugins=builtins_only, only=["attribution", "estimate"])
    data = report.to_dict()
    assert (data["kind"], data["name"], data["plugin"], data["ok"]) == ("quantization", "none",
                                                                        "builtin-quantization", True)
    assert [r["name"] for r in data["results"]] == ["attribution", "estimate"]
    assert '"measured"' in report.to_json()
    assert report.render().splitlines()[1].startswith("PASSED  attribution: ")


def test_unknown_check_names_the_known_ones(builtins_only):
    with pytest.raises(ValueError, match="unknown quantization check.*'estimat'.*listing, attribution"):
        conformance.check_backend("none", plugins=builtins_only, only=["estimat"])


def test_allocation_peak_replays_exact_bytes():
    import torch

    with conformance.AllocationPeak() as peak:
        kept = torch.empty(1000, dtype=torch.uint8)
        work = torch.empty(4000, dtype=torch.uint8)
        del work
        more = torch.empty(500, dtype=torch.uint8)
    assert peak.peak["cpu"] == 5000 and peak.live["cpu"] == 1500 and peak.transient_peak["cpu"] == 4000
    assert kept.numel() + more.numel() == 1500 and peak.complete(1500) and not peak.complete(3000)


def test_stored_bytes_counts_each_storage_once(tiny_checkpoint, builtins_only):
    model = loadstone.load(str(tiny_checkpoint("gpt2")), placement="cpu", trainable=False, progress=False,
                           plugins=builtins_only).model
    tensors = dict(model.named_parameters(remove_duplicate=False))
    assert tensors["lm_head.weight"].data_ptr() == tensors["transformer.wte.weight"].data_ptr()
    unique = {t.data_ptr(): t.untyped_storage().nbytes() for t in [*tensors.values(), *model.buffers()]}
    assert conformance.stored_bytes(model) == sum(unique.values())
