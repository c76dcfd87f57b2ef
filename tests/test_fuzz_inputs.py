"""Any JSON value in any field: config.json, adapter_config.json, the shard index, a --device-map
file, an -o value. Whatever hypothesis writes there, ``plan`` either succeeds or raises a
:class:`~loadstone.LoadstoneError` (the CLI: exit 0 or 2, one paragraph, never a traceback),
within a bounded time; and where ``plan`` succeeds, ``load`` succeeds too (issue 7's rule: a plan
that passes means a load that will not be refused for its input).

Derandomized and bounded so that a failure reproduces on every run and the suite stays fast;
hypothesis prints the smallest input that broke it. ``LOADSTONE_FUZZ_EXAMPLES`` raises the count
for a longer local hunt.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import loadstone
from loadstone import LoadstoneError
from loadstone.cli import main
from loadstone.safetensors_header import SAFETENSORS_DTYPE_BITS

sys.path.insert(0, str(Path(__file__).parent))  # tests/ is not a package (--import-mode=importlib)

EXAMPLES = int(os.environ.get("LOADSTONE_FUZZ_EXAMPLES", "25"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                derandomize=not os.environ.get("LOADSTONE_FUZZ_RANDOM"),
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
#: Seconds one plan (and the load after it) may take on a tiny checkpoint: generous for a loaded CI
#: machine, far below what an unbounded input costs (minutes, or memory until the kernel kills it).
TIME_LIMIT = 60

scalars = (st.none() | st.booleans() | st.integers(-3, 300) | st.integers(-2**70, 2**70) | st.floats(allow_nan=True)
           | st.text(max_size=12) | st.sampled_from(["float32", "bfloat16", "int8", "llama", "LORA", "CAUSAL_LM",
                                                     "cpu", "disk", "meta", "cuda:0", ".*", "(a+)+$", "q_proj",
                                                     "~x/y", "org/..", "a" * 300, 0, -1, 10**12, 2**62]))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=10)
deep = st.integers(33, 200).map(lambda n: json.loads("[" * n + "]" * n))
values = json_values | deep


def _write_json(path: Path, data: Any, duplicate: str | None = None) -> None:
    text = json.dumps(data)  # NaN and Infinity are written as such, as Python's json does
    if duplicate is not None and isinstance(data, dict) and text.endswith("}") and len(text) > 2:
        text = text[:-1] + f", {json.dumps(duplicate)}: 1}}"
    path.write_text(text)


def _plan_then_load(reference: str, **kwargs: Any) -> None:
    """The property every fuzz test checks."""
    started = time.monotonic()
    try:
        loadstone.plan(reference, placement="cpu", **kwargs)
    except LoadstoneError as error:
        assert error.exit_code == 2 and error.fix and error.field, error
    else:
        loadstone.load(reference, placement="cpu", progress=False, **kwargs)
    assert time.monotonic() - started < TIME_LIMIT


@pytest.fixture(scope="module")
def llama(tiny_checkpoint) -> Path:
    return tiny_checkpoint("llama")


@pytest.fixture(scope="module")
def llama_sharded(tiny_checkpoint) -> Path:
    return tiny_checkpoint("llama", max_shard_size="200KB")


@pytest.fixture(scope="module")
def lora(tiny_adapter) -> Path:
    return tiny_adapter("llama")


CONFIG_KEYS = ["model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "intermediate_size", "vocab_size", "head_dim", "max_position_embeddings", "rms_norm_eps", "dtype",
               "torch_dtype", "architectures", "quantization_config", "auto_map", "rope_parameters",
               "tie_word_embeddings", "text_config", "pad_token_id", "use_cache", "hidden_act", "new_field"]


@FUZZ
@given(edits=st.dictionaries(st.sampled_from(CONFIG_KEYS), values, min_size=1, max_size=3),
       duplicate=st.none() | st.sampled_from(CONFIG_KEYS), engine=st.sampled_from(["auto", "transformers"]))
def test_any_value_in_config_json(llama, edits, duplicate, engine):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        shutil.copytree(llama, folder)
        config = json.loads((folder / "config.json").read_text())
        config.update(edits)
        _write_json(folder / "config.json", config, duplicate)
        _plan_then_load(str(folder), engine=engine)


ADAPTER_KEYS = ["peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules",
                "rank_pattern", "alpha_pattern", "modules_to_save", "layers_to_transform", "layers_pattern",
                "base_model_name_or_path", "revision", "bias", "use_dora", "init_lora_weights", "fan_in_fan_out",
                "inference_mode", "megatron_config", "target_parameters", "new_field"]


@FUZZ
@given(edits=st.dictionaries(st.sampled_from(ADAPTER_KEYS), values, min_size=1, max_size=3),
       duplicate=st.none() | st.sampled_from(ADAPTER_KEYS), trainable=st.booleans())
def test_any_value_in_adapter_config_json(llama, lora, edits, duplicate, trainable):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "adapter"
        shutil.copytree(lora, folder)
        config = json.loads((folder / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = str(llama)
        config.update(edits)
        _write_json(folder / "adapter_config.json", config, duplicate)
        _plan_then_load(str(folder), trainable=trainable)


SHARD_NAMES = st.sampled_from(["model-00001-of-00003.safetensors", "./model-00002-of-00003.safetensors",
                               ".//model-00003-of-00003.safetensors", "../model-00001-of-00003.safetensors",
                               "/etc/passwd", "", ".", "sub/../model-00001-of-00003.safetensors"])


@FUZZ
@given(tensor=st.sampled_from(["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight", "new.weight"]),
       shard=SHARD_NAMES | values, metadata=st.none() | st.just("drop") | values, top=st.none() | values,
       engine=st.sampled_from(["auto", "transformers"]))
def test_any_value_in_the_shard_index(llama_sharded, tensor, shard, metadata, top, engine):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        shutil.copytree(llama_sharded, folder)
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        index["weight_map"][tensor] = shard
        if metadata == "drop":
            index.pop("metadata", None)
        elif metadata is not None:
            index["metadata"] = metadata
        if top is not None:
            index["extra"] = top
        _write_json(folder / "model.safetensors.index.json", index)
        _plan_then_load(str(folder), engine=engine)


@FUZZ
@given(tensor=st.sampled_from(["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                               "model.norm.weight", "lm_head.weight"]),
       dtype=st.sampled_from(sorted(SAFETENSORS_DTYPE_BITS)), flat=st.booleans())
def test_any_dtype_for_a_weight(llama, tensor, dtype, flat):
    """A header that relabels one float32 weight's bytes as another dtype (the file stays valid):
    refused at plan time unless the dtype is a floating one, and then loaded as the plan says."""
    import math

    from corpus import SINGLE, edit_header

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        shutil.copytree(llama, folder)

        def relabel(header: dict) -> None:
            entry = header[tensor]
            bits = SAFETENSORS_DTYPE_BITS[dtype]
            nbytes = entry["data_offsets"][1] - entry["data_offsets"][0]
            if bits == 32 and not flat:
                entry["dtype"] = dtype  # same shape, same bytes: only the dtype differs
            elif (nbytes * 8) % bits == 0:
                entry.update(dtype=dtype, shape=[nbytes * 8 // bits])
            assert math.prod(entry["shape"]) * bits == nbytes * 8 or entry["dtype"] != dtype

        edit_header(folder / SINGLE, relabel)
        _plan_then_load(str(folder))


def _cli(*argv: str) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as exc:  # argparse's own usage errors
            code = exc.code
    return code, err.getvalue()


def _assert_clean_exit(code: int, err: str) -> None:
    assert code in (0, 2), (code, err)
    if code == 2:
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error ("), err  # one paragraph, no traceback


DEVICES = st.sampled_from(["cpu", "disk", "meta", "cuda", "cuda:0", "0", "mps", "xpu:0", "gpu7", ""]) | st.integers(-2, 3)


@FUZZ
@given(content=values | st.dictionaries(st.sampled_from(["", "model", "model.layers", "lm_head", "nope"]),
                                        DEVICES | values, max_size=4), raw=st.none() | st.binary(max_size=30))
def test_any_device_map_file(llama, content, raw):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "map.json"
        if raw is not None:
            path.write_bytes(raw)
        else:
            _write_json(path, content)
        started = time.monotonic()
        code, err = _cli("plan", str(llama), "--device-map", str(path), "--quiet")
        _assert_clean_exit(code, err)
        if code == 0:
            code, err = _cli("load", str(llama), "--device-map", str(path), "--quiet", "--offload-folder",
                             str(Path(tmp) / "offload"))
            assert code == 0 or "does not fit" in err, err  # a map onto disk needs the offload folder it got
        assert time.monotonic() - started < TIME_LIMIT


@FUZZ
@given(flag=st.sampled_from(["-o", "-e"]),
       key=st.sampled_from(["double_quant", "compute_dtype", "quant_storage", "keep_modules", "readers", "chunk_bytes",
                            "reader", "x"]),
       value=st.text(max_size=20) | values.map(json.dumps), method=st.sampled_from(["none", "nf4"]))
def test_any_quantization_or_engine_option_value(llama, flag, key, value, method):
    started = time.monotonic()
    code, err = _cli("plan", str(llama), "-q", method, flag, f"{key}={value}", "--placement", "cpu")
    _assert_clean_exit(code, err)
    assert time.monotonic() - started < TIME_LIMIT
