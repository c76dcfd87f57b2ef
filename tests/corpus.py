"""A corpus of malformed checkpoints and adapters, each derived from a valid tiny one.

Every :class:`Case` names the damage, the error loadstone must raise and key words its message
must contain (file name, field, expected/found numbers, fix). :func:`materialize` copies the valid
source into a fresh folder and applies the damage; the test runs ``loadstone.plan`` and
``loadstone.load`` on the result. Sources (built once per session by the test module):

``single``  a Llama checkpoint in one ``model.safetensors``
``sharded`` the same architecture in three shards plus ``model.safetensors.index.json``
``mixtral`` a Mixtral checkpoint (per-expert tensors that transformers fuses on load)
``adapter`` a LoRA adapter for ``single`` (the case folder holds ``model/`` and ``adapter/``)
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from loadstone import (
    AdapterError,
    CheckpointError,
    ConfigError,
    LoadstoneError,
    UnsafeCheckpointError,
    WeightsMismatchError,
)

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
SHARD1, SHARD2, SHARD3 = (f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3))
Q_PROJ = "model.layers.0.self_attn.q_proj.weight"  # [64, 64] float32 in every Llama source


@dataclass(frozen=True)
class Case:
    """One malformed input. ``damage(root)`` edits the copy under ``root`` (``root/model``, and
    ``root/adapter`` for adapter cases) and may return ``reference``, ``kwargs`` and extra ``words``
    that depend on the copy (e.g. its file size)."""

    name: str
    source: str
    damage: Callable[[Path], dict[str, Any] | None]
    error: type[LoadstoneError]
    words: tuple[str, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class Materialized:
    reference: str
    kwargs: dict[str, Any]
    words: tuple[str, ...]


# ----------------------------------------------------------------------------- safetensors surgery


def read_raw(path: Path) -> tuple[dict[str, Any], bytes]:
    """(header as a dict, data section) of a safetensors file, without the safetensors library."""
    blob = path.read_bytes()
    n = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def write_raw(path: Path, header: dict[str, Any] | str | bytes, data: bytes, *, declared: int | None = None) -> None:
    text = header if isinstance(header, (str, bytes)) else json.dumps(header)
    raw = text.encode("utf-8") if isinstance(text, str) else text
    path.write_bytes((declared if declared is not None else len(raw)).to_bytes(8, "little") + raw + data)


def edit_header(path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    header, data = read_raw(path)
    edit(header)
    write_raw(path, header, data)


def by_offset(header: dict[str, Any]) -> list[str]:
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


def resave(path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    """Re-save a file through safetensors after editing its tensors (a well-formed file, wrong content)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def shard_of(folder: Path, tensor: str) -> Path:
    return folder / json.loads((folder / INDEX).read_text())["weight_map"][tensor]


def edit_json(path: Path, edit: Callable[[dict[str, Any]], Any]) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


# ----------------------------------------------------------------------------- damage functions


def _lfs(root: Path) -> dict:
    (root / "model" / SINGLE).write_text("version https://git-lfs.github.com/spec/v1\n"
                                         "oid sha256:4d7a2146\nsize 462176\n")
    return {}


def _declared_header(value: int) -> Callable[[Path], dict]:
    def damage(root: Path) -> dict:
        path = root / "model" / SINGLE
        size = path.stat().st_size
        with open(path, "r+b") as fh:
            fh.write((size if value < 0 else value).to_bytes(8, "little"))
        return {"words": (f"at most {size - 8} bytes", f"found: {size} bytes")} if value < 0 else {}
    return damage


def _raw_header(text: bytes) -> Callable[[Path], dict]:
    def damage(root: Path) -> dict:
        path = root / "model" / SINGLE
        write_raw(path, text, read_raw(path)[1])
        return {}
    return damage


def _entry(key: str, value: Any) -> Callable[[Path], dict]:
    return lambda root: edit_header(root / "model" / SINGLE, lambda h: h[Q_PROJ].__setitem__(key, value))


def _overlap(root: Path) -> None:
    def edit(h: dict) -> None:  # o_proj (same size as q_proj) claims q_proj's bytes
        first, second = sorted([Q_PROJ, Q_PROJ.replace("q_proj", "o_proj")], key=lambda k: h[k]["data_offsets"][0])
        h[second]["data_offsets"] = list(h[first]["data_offsets"])
    edit_header(root / "model" / SINGLE, edit)


def _gap(root: Path) -> None:  # forget a tensor in the middle: its bytes become a hole
    edit_header(root / "model" / SINGLE, lambda h: h.pop(by_offset(h)[len(by_offset(h)) // 2]))


def _out_of_range(root: Path) -> dict:
    path = root / "model" / SINGLE
    header, data = read_raw(path)
    last = by_offset(header)[-1]
    header[last]["data_offsets"] = [o + 4096 for o in header[last]["data_offsets"]]
    write_raw(path, header, data)
    return {"words": (repr(last), f"{path.stat().st_size} bytes")}


def _truncate(root: Path) -> dict:
    path = root / "model" / SINGLE
    size = path.stat().st_size
    os.truncate(path, size - 1000)
    return {"words": (f"{size} bytes (8 + ", f"found: {size - 1000} bytes")}


def _trailing(root: Path) -> dict:
    path = root / "model" / SINGLE
    size = path.stat().st_size
    with open(path, "ab") as fh:
        fh.write(b"\0" * 24)
    return {"words": ("24 extra bytes", f"{size} bytes (8 + ", f"found: {size + 24} bytes")}


def _duplicate(root: Path) -> None:
    path = root / "model" / SINGLE
    header, data = read_raw(path)
    text = json.dumps(header)
    entry = json.dumps({Q_PROJ: header[Q_PROJ]})[1:-1]
    write_raw(path, text[:-1] + ", " + entry + "}", data)  # JSON allows it; safetensors keeps the last


def _append_tensor(path: Path, name: str, like: str, source: Path) -> None:
    """Add ``name`` to ``path`` with the bytes of tensor ``like`` from ``source``."""
    header, data = read_raw(path)
    src_header, src_data = read_raw(source)
    begin, end = src_header[like]["data_offsets"]
    header[name] = {**src_header[like], "data_offsets": [len(data), len(data) + end - begin]}
    write_raw(path, header, data + src_data[begin:end])


def _two_shards(root: Path) -> dict:
    folder = root / "model"
    home = shard_of(folder, Q_PROJ)
    other = next(folder / s for s in (SHARD1, SHARD2, SHARD3) if folder / s != home)
    _append_tensor(other, Q_PROJ, Q_PROJ, home)
    return {"words": (home.name, other.name)}


def _index_entry(value: str) -> Callable[[Path], None]:
    return lambda root: edit_json(root / "model" / INDEX, lambda d: d["weight_map"].__setitem__(Q_PROJ, value))


def _symlink_escape(root: Path) -> None:
    folder = root / "model"
    outside = root / "elsewhere.safetensors"
    shutil.copyfile(shard_of(folder, Q_PROJ), outside)
    (folder / "model-linked.safetensors").symlink_to(outside)
    edit_json(folder / INDEX, lambda d: d["weight_map"].update(
        {k: "model-linked.safetensors" for k, v in d["weight_map"].items() if v == shard_of(folder, Q_PROJ).name}))


def _index_duplicate(root: Path) -> None:
    path = root / "model" / INDEX
    entries = [f"{json.dumps(k)}: {json.dumps(v)}" for k, v in json.loads(path.read_text())["weight_map"].items()]
    path.write_text('{"weight_map": {' + ", ".join(entries + [f'"{Q_PROJ}": "{SHARD2}"']) + "}}")


def _remove_from_sharded(root: Path) -> dict:
    folder = root / "model"
    shard = shard_of(folder, Q_PROJ)
    resave(shard, lambda t: t.pop(Q_PROJ))
    edit_json(folder / INDEX, lambda d: d["weight_map"].pop(Q_PROJ))
    return {}


def _config(edit: Callable[[dict], Any]) -> Callable[[Path], None]:
    return lambda root: edit_json(root / "model" / "config.json", edit)


def _pickle_only(root: Path) -> None:
    import torch
    from safetensors.torch import load_file

    folder = root / "model"
    torch.save(load_file(folder / SINGLE), folder / "pytorch_model.bin")
    (folder / SINGLE).unlink()


class _Payload:
    """Unpickling this would create ``marker``: the shape of a real attack, with a harmless effect."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def malicious_pickle(path: Path, marker: Path) -> None:
    import torch

    torch.save({Q_PROJ: torch.zeros(2), "payload": _Payload(marker)}, path)


def _pickle_malicious(root: Path) -> None:
    folder = root / "model"
    malicious_pickle(folder / "pytorch_model.bin", root / "MARKER")
    (folder / SINGLE).unlink()


def _adapter_json(edit: Callable[[dict], Any]) -> Callable[[Path], None]:
    return lambda root: edit_json(root / "adapter" / "adapter_config.json", edit)


def _adapter_tensors(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    return lambda root: resave(root / "adapter" / "adapter_model.safetensors", edit)


def _zero_sized(tensors: dict) -> None:
    import torch

    name = sorted(k for k in tensors if "lora_A" in k)[0]
    tensors[name] = torch.zeros(0, 64)


def _model_config_as_adapter(root: Path) -> None:
    shutil.copyfile(root / "model" / "config.json", root / "adapter" / "adapter_config.json")


def _unlink(*parts: str) -> Callable[[Path], None]:
    return lambda root: root.joinpath(*parts).unlink()


def _empty_weights(root: Path) -> None:
    for p in (root / "model").glob("*.safetensors"):
        p.unlink()


# ----------------------------------------------------------------------------- the corpus

FIX_RESAVE = "re-save"
C, W, A, U = CheckpointError, WeightsMismatchError, AdapterError, UnsafeCheckpointError
CASES: list[Case] = [
    # safetensors, one file
    Case("lfs_pointer", "single", _lfs, C, (SINGLE, "Git LFS pointer", "git lfs pull")),
    Case("too_short", "single", lambda root: (root / "model" / SINGLE).write_bytes(b"\x01\x02\x03"), C,
         (SINGLE, "too short", "header length", "at least 8 bytes", "3 bytes")),
    Case("header_length_past_eof", "single", _declared_header(-1), C,
         (SINGLE, "past the end of the file", "header length", FIX_RESAVE)),
    Case("header_over_format_limit", "single", _declared_header(100_000_001), C,
         (SINGLE, "larger than the safetensors limit", "header length", "at most 100000000 bytes (the format's limit)",
          "100000001 bytes")),
    Case("header_not_utf8", "single", _raw_header(b'{"a\xff\xfe": 1}'), C, (SINGLE, "not UTF-8", "field: header")),
    Case("header_not_json", "single", _raw_header(b"{not json at all"), C, (SINGLE, "not valid JSON", "field: header")),
    Case("header_not_object", "single", _raw_header(b"[1, 2, 3]"), C, (SINGLE, "not a JSON object", "list")),
    Case("unknown_dtype", "single", _entry("dtype", "Q7"), C, (SINGLE, Q_PROJ, ".dtype", "'Q7'", "BF16")),
    Case("negative_shape", "single", _entry("shape", [-64, 64]), C, (SINGLE, ".shape", "non-negative", "[-64, 64]")),
    Case("offsets_not_a_pair", "single", _entry("data_offsets", [0]), C, (SINGLE, ".data_offsets", "[begin, end]")),
    Case("offsets_overlap", "single", _overlap, C, (SINGLE, "overlap", "data_offsets", "begin >= ")),
    Case("offsets_gap", "single", _gap, C, (SINGLE, "unused bytes", "gap", "begin = ")),
    Case("offsets_out_of_range", "single", _out_of_range, C, (SINGLE, "ends at byte", "file size")),
    Case("shape_times_dtype_not_span", "single", _entry("shape", [64, 65]), C,
         (SINGLE, Q_PROJ, "needs 16640", "expected: 16640 bytes", "found: 16384 bytes")),
    Case("truncated_data", "single", _truncate, C, (SINGLE, "truncated", "file size")),
    Case("extra_trailing_bytes", "single", _trailing, C, (SINGLE, "after its last tensor", "file size")),
    Case("duplicate_tensor_name", "single", _duplicate, C, (SINGLE, Q_PROJ, "twice", "unique tensor names")),
    Case("metadata_not_strings", "single",
         lambda root: edit_header(root / "model" / SINGLE, lambda h: h.__setitem__("__metadata__", {"format": 1})),
         C, (SINGLE, "__metadata__", "{str: str}")),
    Case("no_weight_files", "single", _empty_weights, C, ("holds no weights", "model.safetensors or", "config.json")),
    # sharded index
    Case("shard_missing", "sharded", _unlink("model", SHARD2), C, (SHARD2, "missing", "weight_map", "download")),
    Case("index_names_absent_tensor", "sharded",
         lambda root: edit_json(root / "model" / INDEX, lambda d: d["weight_map"].__setitem__("model.ghost.weight", SHARD1)),
         C, (INDEX, "model.ghost.weight", SHARD1, "no shard holds it", "regenerate the index")),
    Case("index_points_at_wrong_shard", "sharded", lambda root: _index_entry(
        SHARD3 if shard_of(root / "model", Q_PROJ).name != SHARD3 else SHARD1)(root), C, (INDEX, Q_PROJ, "it is in")),
    Case("tensor_in_two_shards", "sharded", _two_shards, C, (Q_PROJ, "two shards", "exactly one shard")),
    Case("index_parent_path", "sharded", _index_entry("../" + SHARD1), C,
         (INDEX, "outside the checkpoint folder", "'../" + SHARD1, "weight_map")),
    Case("index_absolute_path", "sharded", _index_entry("/etc/passwd"), C,
         (INDEX, "outside the checkpoint folder", "'/etc/passwd'")),
    Case("index_symlink_escapes", "sharded", _symlink_escape, C,
         (INDEX, "link leading outside", "model-linked.safetensors ->", "elsewhere.safetensors", "copy the shard")),
    Case("index_not_json", "sharded", lambda root: (root / "model" / INDEX).write_text("{\"weight_map\": "), C,
         (INDEX, "not valid JSON", "regenerate the index")),
    Case("index_without_weight_map", "sharded", lambda root: edit_json(root / "model" / INDEX, lambda d: d.pop("weight_map")),
         C, (INDEX, "no usable weight_map", "field: weight_map")),
    Case("index_lists_tensor_twice", "sharded", _index_duplicate, C, (INDEX, Q_PROJ, "twice")),
    Case("shard_is_lfs_pointer", "sharded", lambda root: (root / "model" / SHARD3).write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 1\n"), C, (SHARD3, "Git LFS pointer")),
    # config.json
    Case("config_missing", "single", _unlink("model", "config.json"), ConfigError,
         ("config.json", "no such file", "save_pretrained")),
    Case("config_not_json", "single", lambda root: (root / "model" / "config.json").write_text("{'model_type':"),
         ConfigError, ("config.json", "not valid JSON", "re-download")),
    Case("config_not_object", "single", lambda root: (root / "model" / "config.json").write_text("[]"),
         ConfigError, ("config.json", "not a JSON object", "list")),
    Case("unknown_model_type_with_code", "single", _config(lambda c: c.update(
        model_type="llamazing", auto_map={"AutoConfig": "modeling_llamazing.LlamazingConfig"})), ConfigError,
        ("config.json", "'llamazing'", "trust_remote_code is off", "modeling_llamazing.py", "reviewed")),
    Case("unknown_model_type_no_code", "single", _config(lambda c: c.update(model_type="llamazing")), ConfigError,
         ("config.json", "'llamazing'", "trust_remote_code is off", "upgrade transformers")),
    # weights vs architecture (decided from headers, in the plan stage)
    Case("missing_tensor", "single", lambda root: resave(root / "model" / SINGLE, lambda t: t.pop(Q_PROJ)), W,
         (SINGLE, "1 missing", Q_PROJ, "randomly initialised", "LlamaForCausalLM")),
    Case("missing_tensor_sharded", "sharded", _remove_from_sharded, W, (INDEX, "1 missing", Q_PROJ)),
    Case("unexpected_tensor", "single", lambda root: resave(
        root / "model" / SINGLE, lambda t: t.__setitem__("model.layers.0.extra.weight", t[Q_PROJ].clone())), W,
        (SINGLE, "1 unexpected", "model.layers.0.extra.weight")),
    Case("shape_mismatch", "single", lambda root: resave(
        root / "model" / SINGLE, lambda t: t.__setitem__(Q_PROJ, t[Q_PROJ][:, :32].clone())), W,
        (SINGLE, "wrong shape", Q_PROJ, "[64, 32] in the checkpoint but [64, 64] in the model")),
    Case("config_of_another_size", "single", _config(lambda c: c.update(intermediate_size=96)), W,
         ("wrong shape", "model.layers.0.mlp.down_proj.weight", "[64, 128] in the checkpoint but [64, 96]")),
    Case("moe_expert_missing", "mixtral", lambda root: resave(
        root / "model" / SINGLE, lambda t: t.pop("model.layers.0.block_sparse_moe.experts.1.w1.weight")), W,
        ("cannot be assembled", "model.layers.0.mlp.experts.gate_up_proj", "MixtralForCausalLM")),
    Case("moe_expert_wrong_shape", "mixtral", lambda root: resave(
        root / "model" / SINGLE, lambda t: t.__setitem__("model.layers.1.block_sparse_moe.experts.2.w2.weight",
                                                          t["model.layers.1.block_sparse_moe.experts.2.w2.weight"][:, :64].clone())),
         W, ("model.layers.1.mlp.experts.down_proj", "cannot be assembled")),
    # pickle
    Case("pickle_not_allowed", "single", _pickle_only, U,
         ("pytorch_model.bin", "can execute code", "allow_pickle=True", "weights_only=True")),
    Case("pickle_malicious_even_when_allowed", "single", _pickle_malicious, U,
         ("pytorch_model.bin", "refused to unpickle", "pickle contents", "trust"), {"allow_pickle": True}),
    Case("pickle_corrupt", "single", lambda root: ((root / "model" / "pytorch_model.bin").write_bytes(b"PK\x03\x04junk"),
                                                   (root / "model" / SINGLE).unlink()), C,
         ("pytorch_model.bin", "not a readable PyTorch checkpoint"), {"allow_pickle": True}),
    # adapters
    Case("adapter_config_missing", "adapter", lambda root: ((root / "adapter" / "adapter_config.json").unlink(),
                                                            {"reference": str(root / "model"),
                                                             "kwargs": {"adapters": {"extra": str(root / "adapter")}}})[1],
         A, ("adapter_config.json", "not an adapter folder", "no such file")),
    Case("adapter_config_is_model_config", "adapter", _model_config_as_adapter, A,
         ("adapter_config.json", "looks like a model config", "peft_type", "config.json")),
    Case("adapter_unknown_peft_type", "adapter", _adapter_json(lambda c: c.update(peft_type="SUPERLORA")), A,
         ("adapter_config.json", "unknown peft_type", "SUPERLORA", "LORA", "upgrade peft")),
    Case("adapter_base_missing", "adapter", _adapter_json(lambda c: c.update(base_model_name_or_path="/no/such/base")),
         A, ("adapter_config.json", "base_model_name_or_path", "/no/such/base", "base=PATH")),
    Case("adapter_weights_missing", "adapter", _unlink("adapter", "adapter_model.safetensors"), A,
         ("adapter_model.safetensors", "no weights file", "adapter_model.bin")),
    Case("adapter_without_tensors", "adapter", _adapter_tensors(lambda t: t.clear()), A,
         ("adapter_model.safetensors", "has no tensors")),
    Case("adapter_tensor_zero_sized", "adapter", _adapter_tensors(_zero_sized), A,
         ("adapter_model.safetensors", "is empty", "[0, 64]")),
    Case("adapter_targets_absent", "adapter", _adapter_json(lambda c: c.update(target_modules=["qkv_fused"])), A,
         ("adapter_config.json", "target_modules", "qkv_fused", "does not have")),
    Case("adapter_pickle_weights", "adapter", lambda root: (
        root / "adapter" / "adapter_model.safetensors").rename(root / "adapter" / "adapter_model.bin"), U,
        ("adapter_model.bin", "pickle", "allow_pickle=True")),
    Case("adapter_weights_truncated", "adapter", lambda root: os.truncate(
        root / "adapter" / "adapter_model.safetensors", 100), C, ("adapter_model.safetensors", "file size")),
]


def materialize(case: Case, sources: dict[str, Path], root: Path) -> Materialized:
    """Copy the case's valid source under ``root`` and damage it."""
    if case.source == "adapter":
        shutil.copytree(sources["single"], root / "model")
        shutil.copytree(sources["adapter"], root / "adapter")
        edit_json(root / "adapter" / "adapter_config.json",
                  lambda c: c.update(base_model_name_or_path=str(root / "model")))
        reference = root / "adapter"
    else:
        shutil.copytree(sources[case.source], root / "model")
        reference = root / "model"
    extra = case.damage(root)
    extra = extra if isinstance(extra, dict) else {}
    return Materialized(str(extra.get("reference", reference)), {**case.kwargs, **extra.get("kwargs", {})},
                        case.words + tuple(extra.get("words", ())))
