"""Plans of Hub repos that are not cached read configs and safetensors headers only.

huggingface_hub's real client talks to a small Hub-shaped server in this process
(``tests/hub_server.py``) serving the tiny checkpoint; the server's log says which bytes were read.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

import loadstone
from loadstone.testing import make_lora_adapter

sys.path.insert(0, str(Path(__file__).parent))  # tests/ is not a package (--import-mode=importlib)
import corpus  # noqa: E402
from hub_server import HubServer, Repo  # noqa: E402

COMMIT = "a1b2c3d4e5f60718293a4b5c6d7e8f9012345678"
BROKEN_COMMIT = "0badc0de0badc0de0badc0de0badc0de0badc0de"
BUDGET = {"placement": "auto", "max_memory": {"cpu": 400_000}}  # splits the model between cpu and disk


@pytest.fixture(scope="module")
def broken_checkpoint(sharded_llama, tmp_path_factory) -> Path:
    """The checkpoint with one tensor whose shape no longer matches its byte span."""
    folder = tmp_path_factory.mktemp("broken") / "model"
    shutil.copytree(sharded_llama, folder)
    shard = sorted(folder.glob("*.safetensors"))[1]
    name = corpus.by_offset(corpus.read_raw(shard)[0])[0]
    corpus.edit_header(shard, lambda h: h[name].__setitem__("shape", [d + 1 for d in h[name]["shape"]]))
    return folder


@pytest.fixture(scope="module")
def hub_adapter(sharded_llama, tmp_path_factory) -> Path:
    return make_lora_adapter(sharded_llama, tmp_path_factory.mktemp("hub-lora") / "lora", base_reference="org/tiny")


@pytest.fixture
def hub(sharded_llama, broken_checkpoint, hub_adapter, monkeypatch):
    repos = {"org/tiny": Repo(sharded_llama, COMMIT), "org/broken": Repo(broken_checkpoint, BROKEN_COMMIT),
             "org/tiny-lora": Repo(hub_adapter, COMMIT)}
    with HubServer(repos) as server:
        # What HF_ENDPOINT sets when huggingface_hub is imported (constants.py); the client reads
        # these module attributes on every call. test_hf_endpoint_in_a_fresh_interpreter sets the
        # variable itself. HF_HUB_OFFLINE, read at import too, may have been set by another test.
        from huggingface_hub import constants

        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setattr(constants, "ENDPOINT", server.url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        yield server


def weight_files(folder: Path) -> set[str]:
    return {p.name for p in folder.glob("*.safetensors")}


def header_end(folder: Path, name: str) -> int:
    """Bytes 0 .. header_end-1 of a file are its length prefix and header."""
    return 8 + int.from_bytes((folder / name).read_bytes()[:8], "little")


def assert_only_headers_read(log, folder: Path) -> None:
    weights = weight_files(folder)
    reads = [e for e in log if e.file in weights and e.method == "GET"]
    assert {e.file for e in reads} == weights  # every shard's header was read ...
    for entry in reads:  # ... and nothing past it
        assert entry.range is not None and entry.range[1] < header_end(folder, entry.file), entry
        assert entry.sent == entry.range[1] - entry.range[0] + 1, entry


def cached_weights(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.rglob("*.safetensors"))


def test_plan_of_an_uncached_repo_reads_headers_only(hub, sharded_llama, tmp_path):
    cache = tmp_path / "cache"
    remote = loadstone.plan("org/tiny", cache_dir=str(cache), **BUDGET)
    assert_only_headers_read(hub.take_log(), sharded_llama)
    assert cached_weights(cache) == []
    local = loadstone.plan(str(sharded_llama), **BUDGET)
    assert set(remote.device_map.values()) == {"cpu", "disk"}  # the budget splits it: a real comparison
    assert remote.device_map == local.device_map and remote.bytes_per_device == local.bytes_per_device
    assert remote.report.placement["estimated_bytes"] == local.report.placement["estimated_bytes"]
    theirs, ours = local.report.checkpoint, remote.report.checkpoint
    assert (ours["headers"], theirs["headers"]) == ("remote", "local")
    assert {k: ours[k] for k in ("files", "tensors", "bytes", "index")} == \
        {k: theirs[k] for k in ("files", "tensors", "bytes", "index")}
    base = remote.report.sources["base"]
    assert (base["kind"], base["commit"], base["remote_headers"]) == ("hub", COMMIT, sorted(weight_files(sharded_llama)))


def test_a_load_after_the_plan_downloads_the_weights(hub, sharded_llama, tmp_path, reference_model, same_weights):
    cache = tmp_path / "cache"
    loadstone.plan("org/tiny", cache_dir=str(cache), placement="cpu")
    hub.take_log()
    loaded = loadstone.load("org/tiny", cache_dir=str(cache), placement="cpu", progress=False)
    downloaded = {e.file for e in hub.take_log() if e.method == "GET" and e.range is None}
    assert weight_files(sharded_llama) <= downloaded
    assert cached_weights(cache) == sorted(weight_files(sharded_llama))
    assert loaded.report.checkpoint["headers"] == "local"
    same_weights(loaded.model, reference_model(sharded_llama))
    # Now the cache is complete: a plan uses it without asking the server anything.
    again = loadstone.plan("org/tiny", cache_dir=str(cache), placement="cpu")
    assert hub.take_log() == [] and again.report.checkpoint["headers"] == "local"


def test_a_hub_adapter_is_downloaded_but_its_base_weights_are_not(hub, sharded_llama, hub_adapter, tmp_path):
    cache = tmp_path / "cache"
    planned = loadstone.plan("org/tiny-lora", cache_dir=str(cache), placement="cpu")
    assert_only_headers_read([e for e in hub.take_log() if "/org/tiny/" in e.path], sharded_llama)
    assert cached_weights(cache) == ["adapter_model.safetensors"]
    assert planned.report.sources["adapters"][0]["source"]["repo_id"] == "org/tiny-lora"
    assert planned.report.checkpoint["headers"] == "remote"


def test_a_malformed_remote_header_is_the_same_error_as_a_local_one(hub, broken_checkpoint, tmp_path):
    with pytest.raises(loadstone.CheckpointError) as remote:
        loadstone.plan("org/broken", cache_dir=str(tmp_path / "cache"), placement="cpu")
    with pytest.raises(loadstone.CheckpointError) as local:
        loadstone.plan(str(broken_checkpoint), placement="cpu")
    assert type(remote.value) is type(local.value)
    assert "spans" in local.value.message and "data_offsets" in local.value.field
    for attr in ("message", "field", "expected", "found", "fix"):
        assert getattr(remote.value, attr) == getattr(local.value, attr), attr
    assert Path(remote.value.file).name == Path(local.value.file).name
    assert_only_headers_read(hub.take_log(), broken_checkpoint)


def test_offline_and_uncached_is_a_clear_resolution_error(hub, tmp_path):
    with pytest.raises(loadstone.ResolutionError) as info:
        loadstone.plan("org/tiny", cache_dir=str(tmp_path / "cache"), offline=True, placement="cpu")
    assert "not in the local Hugging Face cache" in info.value.message and "offline" in info.value.message
    assert "hf download org/tiny" in info.value.fix
    assert hub.take_log() == []


def test_offline_after_a_plan_says_the_snapshot_is_partial(hub, tmp_path):
    cache = str(tmp_path / "cache")
    loadstone.plan("org/tiny", cache_dir=cache, placement="cpu")
    with pytest.raises(loadstone.ResolutionError) as info:
        loadstone.load("org/tiny", cache_dir=cache, offline=True, placement="cpu", progress=False)
    assert "only partly in the local Hugging Face cache" in info.value.message


@pytest.mark.slow
def test_hf_endpoint_in_a_fresh_interpreter(hub, sharded_llama, tmp_path, python_subprocess):
    """HF_ENDPOINT as huggingface_hub itself reads it at import time. The resolve stage alone runs,
    so the check needs neither torch nor transformers."""
    code = ("import json, loadstone\n"
            "from loadstone.stages.resolve import resolve_sources\n"
            "base = resolve_sources(loadstone.LoadRequest('org/tiny'), loadstone.get_plugin_manager(),\n"
            "                       weights=False).base\n"
            "print(json.dumps({n: h.size for n, h in base.remote_headers.items()}))\n")
    done = python_subprocess(code, env={"HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(tmp_path / "cache"),
                                        "HF_HUB_OFFLINE": "0", "LOADSTONE_PLUGINS": ""})
    assert done.returncode == 0, done.stderr
    sizes = json.loads(done.stdout.strip().splitlines()[-1])
    assert sizes == {p.name: p.stat().st_size for p in sharded_llama.glob("*.safetensors")}
    assert_only_headers_read(hub.take_log(), sharded_llama)
