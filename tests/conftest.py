"""Shared fixtures for the kernel's tests.

The ``tiny_checkpoint`` / ``tiny_adapter`` fixtures come from ``loadstone.pytest_plugin``; the
helpers here compare models weight for weight and check where every parameter really lives.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest

REPO = Path(__file__).resolve().parents[1]
VENV_PYTHON = sys.executable
FIXTURE_DISTS = REPO / "tests" / "fixtures" / "dists"


@pytest.fixture
def disk_folder(tmp_path: Path) -> Any:
    """An empty folder on a file system whose pages the kernel can drop and that takes O_DIRECT:
    ``tmp_path``, unless that is tmpfs (which keeps every page in memory), then one in the
    checkout, removed afterwards."""
    import shutil
    import tempfile

    best, kind = "", ""
    for line in open("/proc/mounts") if os.path.exists("/proc/mounts") else []:
        mount, fstype = line.split()[1:3]
        if str(tmp_path.resolve()).startswith(mount) and len(mount) > len(best):
            best, kind = mount, fstype
    if kind not in ("tmpfs", "ramfs"):
        yield tmp_path
        return
    folder = Path(tempfile.mkdtemp(dir=REPO, prefix=".disk-folder-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def sharded_llama(tiny_checkpoint: Callable[..., Path]) -> Path:
    """The Llama checkpoint every test shares: three shards plus an index."""
    return tiny_checkpoint("llama", max_shard_size="200KB")


@pytest.fixture(scope="session")
def llama_lora(tiny_adapter: Callable[..., Path], sharded_llama: Path) -> Path:
    """A LoRA adapter (q_proj, v_proj, r=4) whose base is ``sharded_llama``."""
    return tiny_adapter("llama", checkpoint_kwargs={"max_shard_size": "200KB"})


def write_sparse_checkpoint(folder: Path, config: Any) -> int:
    """A float32 checkpoint of ``config``'s model whose data region is a hole: the headers are
    real, the weights never hit the disk (a plan of a multi-GiB model costs nothing). Returns
    the data bytes."""
    import json
    import math
    import struct

    import torch
    import transformers

    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    header, offset = {}, 0
    for name, tensor in model.state_dict().items():
        nbytes = math.prod(tensor.shape) * 4
        header[name] = {"dtype": "F32", "shape": list(tensor.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(folder / "model.safetensors", "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        fh.truncate(8 + len(raw) + offset)
    return offset


def gpu_free_after_cleanup(device: int = 0) -> int:
    """Free memory of a CUDA device once Python's garbage and torch's cached blocks are gone."""
    import gc

    import torch

    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return int(torch.cuda.mem_get_info(device)[0])


def offloaded_state_dict(model: Any) -> dict[str, Any]:
    """The values a model serves, including disk/CPU-offloaded ones (accelerate's view)."""
    from accelerate.utils.modeling import get_state_dict_offloaded_model

    if any(p.device.type == "meta" for p in model.parameters()):
        return get_state_dict_offloaded_model(model)
    return model.state_dict()


def assert_same_weights(model: Any, reference: Any) -> None:
    """Same tensor names, dtypes, shapes and bits (NaNs and -0.0 included)."""
    import torch

    ours, theirs = offloaded_state_dict(model), offloaded_state_dict(reference)
    assert sorted(ours) == sorted(theirs)
    for name, tensor in ours.items():
        other = theirs[name]
        assert tensor.dtype == other.dtype, name
        assert tensor.shape == other.shape, name
        a, b = tensor.detach().cpu().contiguous(), other.detach().cpu().contiguous()
        if a.is_floating_point():
            a, b = a.view(torch.uint8), b.view(torch.uint8)
        assert torch.equal(a, b), f"{name} differs"


def device_for(name: str, device_map: dict[str, Any]) -> Any:
    """The device the map assigns to a parameter name (longest matching prefix)."""
    for prefix in sorted(device_map, key=len, reverse=True):
        if prefix == "" or name == prefix or name.startswith(prefix + "."):
            return device_map[prefix]
    raise AssertionError(f"{name} is not placed by {device_map}")


def assert_placed_as(model: Any, device_map: dict[str, Any]) -> None:
    """Every parameter sits where the map says: ``cpu`` -> a CPU tensor; ``disk`` -> a meta tensor
    whose module carries an accelerate offload hook that reads it from a file on disk (accelerate
    serves safetensors weights from the checkpoint itself, others from the offload folder)."""
    from accelerate.utils.offload import OffloadedWeightsLoader

    modules = dict(model.named_modules())
    for name, param in model.named_parameters():
        want = device_for(name, device_map)
        hook = getattr(modules[name.rpartition(".")[0]], "_hf_hook", None)
        on_disk = set()
        if hook is not None and getattr(hook, "weights_map", None) is not None:
            loader = hook.weights_map.dataset
            assert isinstance(loader, OffloadedWeightsLoader), type(loader)
            on_disk = set(loader.index) - set(loader.state_dict)
        if want == "disk":
            assert param.device.type == "meta", f"{name} should be offloaded to disk, is on {param.device}"
            assert hook is not None and hook.offload, f"{name} has no offload hook"
            assert name in on_disk, f"{name} is not served from disk"
        else:
            assert param.device.type == str(want).split(":")[0], f"{name}: map says {want}, is {param.device}"
            assert name not in on_disk, f"{name} is served from disk but the map says {want}"


@pytest.fixture
def same_weights() -> Callable[[Any, Any], None]:
    return assert_same_weights


@pytest.fixture
def placed_as() -> Callable[..., None]:
    return assert_placed_as


@pytest.fixture
def reference_model() -> Callable[..., Any]:
    """transformers' own ``from_pretrained`` of a folder (the rival loadstone must equal)."""

    def build(folder: Path, task: str = "causal-lm", **kwargs: Any) -> Any:
        import transformers

        auto = {"causal-lm": transformers.AutoModelForCausalLM,
                "sequence-classification": transformers.AutoModelForSequenceClassification}[task]
        return auto.from_pretrained(str(folder), **kwargs)

    return build


def run_python(code: str, *, env: dict[str, str] | None = None, cwd: Path | None = None,
               timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter of this venv (real entry points, real environment)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("LOADSTONE_")}
    full_env.update(env or {})
    return subprocess.run([VENV_PYTHON, "-c", code], env=full_env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture
def python_subprocess() -> Callable[..., subprocess.CompletedProcess]:
    return run_python


@pytest.fixture(scope="session")
def fixture_dist(tmp_path_factory) -> Callable[[str], Path]:
    """``fixture_dist(name)``: tests/fixtures/dists/NAME installed by pip as a real distribution into a
    folder of its own (built from a copy, once per session). Put the folder on ``sys.path`` (or
    ``PYTHONPATH`` of a subprocess) and its entry points are discovered like any installed plugin's."""
    import shutil

    root = tmp_path_factory.mktemp("fixture-dists")
    installed: dict[str, Path] = {}

    def install(name: str) -> Path:
        if name not in installed:
            source, target = root / "src" / name, root / name
            shutil.copytree(FIXTURE_DISTS / name, source)
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                            "--no-input", "--target", str(target), str(source)], check=True, capture_output=True,
                           timeout=300)
            installed[name] = target
        return installed[name]

    return install

