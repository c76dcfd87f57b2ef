"""Fixtures shared by the plugin's tests.

``tiny_checkpoint``, ``tiny_adapter`` and ``plugin_manager`` come from loadstone's pytest plugin.
GPTQ checkpoints are built once per session, two ways: quantized by gptqmodel from calibration
texts (:func:`gptqmodel_checkpoint`), and packed here from known integer codes
(:func:`packed_checkpoint`, see gptq_reference.py).

Two gptqmodel defaults are slow on a small CPU and irrelevant to what is tested, so every test (and
every session fixture, through :func:`cpu_settings`) runs without them: the C++ packing extension,
compiled on first use (~33 s), and TorchLinear's ``torch.compile`` of its dequantization, compiled
on the first forward of each layer (2-7 s). Both are read when they are used (a quantize, a
load), so they are set only around those and never leak into other tests of the session.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # gptq_reference, gptq_support (tests are not a package)

from gptq_support import CALIBRATION, cpu_settings  # noqa: E402


@pytest.fixture(autouse=True)
def gptqmodel_on_cpu() -> Iterator[None]:
    with cpu_settings():
        yield


@pytest.fixture(scope="session", autouse=True)
def quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


@pytest.fixture(scope="session")
def input_ids() -> Any:
    import torch

    return torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="session")
def source_model(tmp_path_factory) -> Path:
    """A tiny bf16 Llama with a real (word-level) tokenizer, as gptqmodel needs one."""
    from loadstone.testing import make_checkpoint
    from loadstone_gptq.testing import save_word_tokenizer

    folder = make_checkpoint("llama", tmp_path_factory.mktemp("source"), dtype="bfloat16")
    return save_word_tokenizer(folder, CALIBRATION)


@pytest.fixture(scope="session")
def gptqmodel_checkpoint(source_model: Path, tmp_path_factory) -> Callable[..., Path]:
    """``gptqmodel_checkpoint(**quantize_kwargs)``: the tiny Llama quantized by gptqmodel (cached)."""
    from loadstone_gptq import quantize

    cache: dict[str, Path] = {}

    def build(**kwargs: Any) -> Path:
        kwargs = {"bits": 4, "group_size": 32, **kwargs}
        key = repr(sorted(kwargs.items()))
        if key not in cache:
            with cpu_settings():
                cache[key] = quantize(source_model, tmp_path_factory.mktemp("gptqmodel"), CALIBRATION,
                                      progress=False, **kwargs)
        return cache[key]

    return build


@pytest.fixture(scope="session")
def packed_checkpoint(tiny_checkpoint: Callable[..., Path], tmp_path_factory) -> Callable[..., tuple]:
    """``packed_checkpoint(arch="llama", bits=, group_size=, desc_act=, sym=, v1=, legacy=)`` -> (GPTQ
    folder, {layer: exact float32 weight}, folder of the same model unquantized), cached."""
    from gptq_reference import write_gptq_checkpoint, write_plain_twin

    cache: dict[str, tuple] = {}

    def build(arch: str = "llama", **kwargs: Any) -> tuple:
        key = repr((arch, sorted(kwargs.items())))
        if key not in cache:
            plain = tiny_checkpoint(arch)
            root = tmp_path_factory.mktemp("packed")
            weights = write_gptq_checkpoint(plain, root / "gptq", **kwargs)
            # The model as the kernel computes it: each weight rounded to float16 once.
            twin = write_plain_twin(root / "gptq", root / "plain", {k: w.half() for k, w in weights.items()})
            cache[key] = (root / "gptq", weights, twin)
        return cache[key]

    return build


@pytest.fixture(scope="session")
def loaded() -> Callable[..., Any]:
    """``loaded(folder, **load_kwargs)``: a cached CPU load for inference."""
    import loadstone

    cache: dict[str, Any] = {}

    def build(folder: Path, **kwargs: Any) -> Any:
        kwargs = {"placement": "cpu", "trainable": False, "progress": False, **kwargs}
        key = repr((str(folder), sorted(kwargs.items())))
        if key not in cache:
            with cpu_settings():
                cache[key] = loadstone.load(str(folder), **kwargs)
        return cache[key]

    return build
