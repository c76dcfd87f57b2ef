"""Hub ids resolved through a real huggingface_hub cache layout, offline, with pinned revisions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import loadstone
from loadstone.testing import make_hub_cache, make_lora_adapter

MAIN = "0123456789abcdef0123456789abcdef01234567"
V2 = "fedcba9876543210fedcba9876543210fedcba98"


@pytest.fixture(scope="module")
def hub(sharded_llama, tmp_path_factory) -> Path:
    """A cache holding org/tiny at two commits (refs main and v2) and an adapter org/tiny-lora
    whose base is the Hub id org/tiny."""
    cache = tmp_path_factory.mktemp("hub-cache")
    make_hub_cache(cache, "org/tiny", sharded_llama, commit=MAIN)
    make_hub_cache(cache, "org/tiny", sharded_llama, commit=V2, ref="v2")
    adapter = make_lora_adapter(sharded_llama, tmp_path_factory.mktemp("hub-lora"), base_reference="org/tiny")
    make_hub_cache(cache, "org/tiny-lora", adapter)
    return cache


def test_cache_layout_is_the_hub_library_s(hub):
    repo = hub / "models--org--tiny"
    assert (repo / "refs" / "main").read_text() == MAIN and (repo / "refs" / "v2").read_text() == V2
    snapshot = repo / "snapshots" / MAIN
    assert (snapshot / "config.json").is_symlink() and (snapshot / "model.safetensors.index.json").is_file()
    from huggingface_hub import scan_cache_dir

    info = scan_cache_dir(hub)
    assert {r.repo_id for r in info.repos} == {"org/tiny", "org/tiny-lora"}
    assert not info.warnings


@pytest.mark.parametrize("reference,kwargs,revision,commit", [
    ("org/tiny", {}, "main", MAIN),
    (f"org/tiny@{MAIN}", {}, MAIN, MAIN),
    ("org/tiny@v2", {}, "v2", V2),
    ("org/tiny", {"revision": V2}, V2, V2),
    ("org/tiny", {"revision": "v2"}, "v2", V2),
])
def test_hub_ids_resolve_offline_with_revisions(hub, reference, kwargs, revision, commit):
    planned = loadstone.plan(reference, cache_dir=str(hub), offline=True, placement="cpu", **kwargs)
    base = planned.report.sources["base"]
    assert (base["kind"], base["repo_id"], base["revision"], base["commit"]) == ("hub", "org/tiny", revision, commit)
    assert base["path"] == str(hub / "models--org--tiny" / "snapshots" / commit)
    assert base["resolver"] == "hub" and base["distribution"].startswith("loadstone ")
    decision = planned.report.decision("source")
    assert decision.choice == "hub" and decision.by == "resolver hub"


def test_a_hub_load_is_the_snapshot_s_weights(hub, sharded_llama, reference_model, same_weights):
    loaded = loadstone.load(f"org/tiny@{V2}", cache_dir=str(hub), offline=True, placement="cpu", progress=False)
    same_weights(loaded.model, reference_model(sharded_llama))


def test_conflicting_revisions_are_refused(hub):
    with pytest.raises(loadstone.LoadstoneError) as info:
        loadstone.plan("org/tiny@v2", revision="main", cache_dir=str(hub), offline=True)
    assert "'v2'" in str(info.value) and "'main'" in str(info.value)


def test_missing_revision_offline_is_a_clear_resolution_error(hub):
    with pytest.raises(loadstone.ResolutionError) as info:
        loadstone.plan("org/tiny@v3", cache_dir=str(hub), offline=True)
    err = info.value
    assert "org/tiny" in err.message and "'v3'" in err.message and "offline" in err.message
    assert err.found == "org/tiny@v3" and "hf download org/tiny --revision v3" in err.fix and str(hub) in err.fix
    assert "leave offline mode" in err.fix and "local folder" not in err.fix  # pinned: clearly a Hub id


@pytest.mark.parametrize("switch", ["argument", "environment"])
def test_the_offline_fix_says_how_to_leave_offline_mode(switch, hub, monkeypatch):
    if switch == "environment":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        kwargs = {}
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        kwargs = {"offline": True}
    with pytest.raises(loadstone.ResolutionError) as info:
        loadstone.plan("org/tiny@v3", cache_dir=str(hub), **kwargs)
    fix = info.value.fix
    # how to get out of offline mode, from the switch that put this load in it (not how to enter it)
    assert "HF_HUB_OFFLINE=1" not in fix
    if switch == "environment":
        assert "unset HF_HUB_OFFLINE" in fix
    else:
        assert "drop offline=True (CLI: --offline)" in fix and "HF_HUB_OFFLINE" not in fix


def test_a_mistyped_local_path_is_not_only_explained_as_a_hub_id(hub, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(loadstone.ResolutionError) as info:
        loadstone.plan("models/llama-typo", cache_dir=str(hub), offline=True)
    assert "models/llama-typo" in info.value.message
    assert f"if you meant a local folder: {tmp_path / 'models' / 'llama-typo'} does not exist" in info.value.fix


def test_adapter_whose_base_is_a_hub_id_resolves_through_the_cache(hub, sharded_llama, tmp_path):
    local_adapter = make_lora_adapter(sharded_llama, tmp_path / "lora", base_reference="org/tiny")
    for reference in (str(local_adapter), "org/tiny-lora"):
        loaded = loadstone.load(reference, cache_dir=str(hub), offline=True, placement="cpu", progress=False)
        sources = loaded.report.sources
        assert (sources["base"]["repo_id"], sources["base"]["commit"]) == ("org/tiny", MAIN)
        assert sources["adapters"][0]["base_model_name_or_path"] == "org/tiny"
        found_by = loaded.report.decision("base source")
        assert (found_by.by, found_by.plugin, found_by.distribution) == ("resolver hub", "builtin-resolvers", "loadstone")
        assert loaded.report.parameters["trainable"] > 0
    assert sources["adapters"][0]["source"]["repo_id"] == "org/tiny-lora"


def test_hf_hub_offline_environment_variable_means_offline(hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    planned = loadstone.plan("org/tiny@v2", cache_dir=str(hub), placement="cpu")
    assert planned.request.offline is True and planned.report.request["offline"] is True
    assert planned.report.sources["base"]["commit"] == V2


@pytest.mark.slow
def test_hf_hub_offline_in_a_fresh_interpreter(hub, python_subprocess):
    """HF_HUB_OFFLINE=1 and HF_HUB_CACHE as huggingface_hub itself reads them at import time. The
    resolve stage alone is run, so the check needs neither torch nor transformers."""
    code = ("import json, loadstone\n"
            "from loadstone.stages.resolve import resolve_sources\n"
            "def resolve(ref):\n"
            "    try:\n"
            "        return resolve_sources(loadstone.LoadRequest(ref), loadstone.get_plugin_manager()).to_dict()\n"
            "    except loadstone.ResolutionError as e:\n"
            "        return {'error': e.message}\n"
            "print(json.dumps([resolve('org/tiny@v2'), resolve('org/tiny'), resolve('org/tiny@v3')]))\n")
    done = python_subprocess(code, env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub), "LOADSTONE_PLUGINS": ""})
    assert done.returncode == 0, done.stderr
    pinned, main, missing = json.loads(done.stdout.strip().splitlines()[-1])
    assert pinned["base"]["commit"] == V2 and pinned["base"]["revision"] == "v2"
    assert main["base"]["commit"] == MAIN and main["base"]["path"].startswith(str(hub))
    assert "offline" in missing["error"] and "'v3'" in missing["error"]
