"""Engines as components: choice at plan time, refusals, the kernel's invariants for any engine,
plugin engines, and the deprecated contract-1 ``weight_loader`` seam."""

from __future__ import annotations

import os
import warnings

from pathlib import Path

import pytest
import torch

import loadstone
from loadstone import hookimpl
from loadstone.testing import ARCHITECTURES


def engines_plugin(*engines: loadstone.Engine):
    class Plugin:
        @hookimpl
        def loadstone_register_engines(self, register):
            for engine in engines:
                register(engine)

    return loadstone.PluginManager(allow=[], extra_plugins=[("test-engines", Plugin())])


class Delegating(loadstone.Engine):
    """Loads with the native engine, then lets a test damage the result."""

    name = "damaging"
    preference = 10

    def __init__(self, damage=lambda model: None):
        self.damage = damage

    def load(self, plan, ctx):
        from loadstone.engines.native import NativeEngine

        model = NativeEngine().load(plan, ctx)
        self.damage(model)
        return model


@pytest.mark.parametrize("dtype", ["bfloat16", "float32", "float16"])
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_both_engines_give_bit_equal_models_in_every_dtype(arch, dtype, tiny_checkpoint, same_weights):
    folder = str(tiny_checkpoint(arch))
    native = loadstone.load(folder, placement="cpu", dtype=dtype, engine="loadstone", trainable=False, progress=False)
    reference = loadstone.load(folder, placement="cpu", dtype=dtype, engine="transformers", trainable=False,
                               progress=False)
    same_weights(native.model, reference.model)
    buffers = dict(reference.model.named_buffers())
    for name, buffer in native.model.named_buffers():  # non-persistent ones too (rotary inv_freq)
        assert torch.equal(buffer, buffers[name]), name
    ids = torch.arange(10).reshape(1, 10)
    with torch.no_grad():
        assert torch.equal(native.model(ids).logits, reference.model(ids).logits)


def test_auto_prefers_the_native_engine_and_says_why(tiny_checkpoint):
    builtins_only = loadstone.PluginManager(allow=[])  # whatever engine plugins are installed
    plan = loadstone.plan(str(tiny_checkpoint("llama")), placement="cpu", plugins=builtins_only)
    assert plan.engine.name == "loadstone" and plan.engine_problems == {"loadstone": [], "transformers": []}
    decision = plan.report.decision("engine")
    assert (decision.by, decision.plugin, decision.distribution) == ("engine loadstone", "builtin-engines", "loadstone")
    assert plan.report.engine["requested"] == "auto" and "engine" in plan.report.render()


def test_pickle_checkpoints_run_on_the_transformers_engine(tiny_checkpoint, tmp_path):
    import shutil

    from safetensors.torch import load_file

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_checkpoint("llama"), folder)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    plan = loadstone.plan(str(folder), allow_pickle=True, placement="cpu")
    assert plan.engine.name == "transformers"
    assert plan.engine_problems["loadstone"] == ["it reads safetensors only, and this checkpoint is pickle"]
    with pytest.raises(loadstone.EngineError) as info:
        loadstone.plan(str(folder), allow_pickle=True, placement="cpu", engine="loadstone")
    assert info.value.field == "engine" and info.value.found == "loadstone" and "pickle" in info.value.message
    assert "engine='auto'" in info.value.fix and "'transformers'" in info.value.fix


def test_unknown_engine_names_the_installed_ones(tiny_checkpoint):
    with pytest.raises(loadstone.ComponentNotFoundError) as info:
        loadstone.plan(str(tiny_checkpoint("llama")), engine="turbo")
    assert "loadstone" in info.value.fix and "transformers" in info.value.fix and "auto" in info.value.fix


def test_a_plugin_engine_is_chosen_by_preference_and_credited(tiny_checkpoint, same_weights):
    folder = str(tiny_checkpoint("gpt2"))
    plugins = engines_plugin(Delegating())
    result = loadstone.load(folder, placement="cpu", plugins=plugins, progress=False)
    decision = result.report.decision("engine")
    assert (decision.choice, decision.plugin, decision.distribution) == ("damaging", "test-engines", "<in-process>")
    reference = loadstone.load(folder, placement="cpu", engine="transformers", progress=False)
    same_weights(result.model, reference.model)
    assert "engine" in {d["kind"] for p in plugins.describe() for d in p["components"]}


@pytest.mark.parametrize(("damage", "words"), [
    (lambda m: setattr(m.model.norm, "weight", torch.nn.Parameter(torch.empty(64, device="meta"))),
     "left on the meta device"),
    (lambda m: setattr(m.model.norm, "weight", torch.nn.Parameter(m.model.norm.weight.to(torch.float16))),
     "not in their planned dtype"),
    (lambda m: setattr(m.lm_head, "weight", torch.nn.Parameter(m.lm_head.weight.clone())),
     "no longer tied"),
])
def test_the_kernel_checks_what_any_engine_returns(damage, words, tiny_checkpoint):
    arch = "gpt2" if words == "no longer tied" else "llama"
    with pytest.raises(loadstone.WeightsMismatchError) as info:
        loadstone.load(str(tiny_checkpoint(arch)), placement="cpu", plugins=engines_plugin(Delegating(damage)),
                       progress=False)
    assert words in str(info.value) and "engine 'damaging'" in str(info.value)


def test_the_check_skips_tensors_accelerate_offloads_by_their_nearest_hook():
    """A module's own hook decides for its tensors, else its closest ancestor's (accelerate keeps
    offloaded parameters on meta, in the hook's weights map)."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    from loadstone.stages.load_weights import _offloaded_modules

    inner = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    model = torch.nn.Sequential(inner, torch.nn.Linear(2, 2))
    assert _offloaded_modules(model) == set()
    weights = dict(model[0].state_dict())
    add_hook_to_module(model[0], AlignDevicesHook(execution_device="cpu", offload=True, weights_map=weights))
    add_hook_to_module(model[0][1], AlignDevicesHook(execution_device="cpu", offload=False))
    assert _offloaded_modules(model) == {"0", "0.0"}  # 0.1 has a hook of its own that does not offload


def test_an_engine_that_crashes_is_named(tiny_checkpoint):
    class Broken(loadstone.Engine):
        name = "broken"
        preference = 1

        def load(self, plan, ctx):
            raise ZeroDivisionError("oops")

    with pytest.raises(loadstone.PluginHookError) as info:
        loadstone.load(str(tiny_checkpoint("llama")), placement="cpu", plugins=engines_plugin(Broken()),
                       progress=False)
    assert info.value.plugin == "test-engines" and info.value.stage == "load_weights"
    assert "engine 'broken': load" in str(info.value)


def test_no_engine_able_is_an_engine_error(tiny_checkpoint, tmp_path):
    only_native = loadstone.PluginManager(allow=[], disable=["transformers"])
    with pytest.raises(loadstone.EngineError) as info:
        loadstone.plan(str(tiny_checkpoint("llama")), plugins=only_native, placement={"": "disk"},
                       offload_folder=str(tmp_path))
    assert "no installed engine can run this load" in info.value.message and "disk" in info.value.message


def test_the_deprecated_weight_loader_still_runs_as_an_engine(tiny_checkpoint):
    folder = str(tiny_checkpoint("llama"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loader = loadstone.TransformersWeightLoader()
        result = loadstone.load(folder, placement="cpu", weight_loader=loader, progress=False)
    assert [w for w in caught if issubclass(w.category, DeprecationWarning)]
    decision = result.report.decision("engine")
    assert decision.choice == "transformers.from_pretrained" and "deprecated" in decision.plugin


def test_native_reads_refuse_a_file_changed_since_the_plan(tiny_checkpoint, tmp_path):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_checkpoint("llama"), folder)

    class Rewrite:
        @hookimpl
        def loadstone_after_plan(self, plan):
            weights = folder / "model.safetensors"
            stat = weights.stat()
            os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # rewritten in place

    plugins = loadstone.PluginManager(allow=[], extra_plugins=[("rewrite", Rewrite())])
    with pytest.raises(loadstone.CheckpointError) as info:
        loadstone.load(str(folder), placement="cpu", engine="loadstone", plugins=plugins, progress=False)
    assert "changed between the plan and the load" in info.value.message and info.value.file.endswith(
        "model.safetensors")


def test_native_reads_refuse_a_file_truncated_mid_load(tiny_checkpoint, tmp_path):
    import shutil

    from loadstone.engines.reader import SafetensorsReader

    folder = tmp_path / "model"
    shutil.copytree(tiny_checkpoint("llama"), folder)
    plan = loadstone.plan(str(folder), placement="cpu")
    weights = folder / "model.safetensors"
    last = max(plan.inventory.tensors.values(), key=lambda t: t.end)
    with SafetensorsReader(plan.inventory) as reader:
        reader.read(plan.inventory.tensors["model.norm.weight"])  # the file is open now
        os.truncate(weights, weights.stat().st_size - 16)
        with pytest.raises(loadstone.CheckpointError) as info:
            reader.read(last)
    assert "truncated during the load" in info.value.message


def test_engine_options_are_checked_and_the_reader_settled_at_plan_time(tiny_checkpoint):
    folder = str(tiny_checkpoint("llama"))
    for weights in Path(folder).glob("*.safetensors"):
        weights.read_bytes()  # in the page cache, whatever the kernel dropped since the session wrote it
    plan = loadstone.plan(folder, placement="cpu", engine_options={"readers": 3, "chunk_bytes": "2MiB"})
    # auto, CPU, the checkpoint in the page cache: leased maps, files without a lease
    # read; pread where the platform has no leases
    from loadstone.engines.leases import leases_supported

    settled = {"reader": "mmap", "unleased": "read"} if leases_supported() else {"reader": "pread"}
    assert plan.engine_options == {"readers": 3, "chunk_bytes": 2 << 20, **settled}
    assert plan.report.engine["options"] == plan.engine_options and "extra_bytes" not in plan.report.engine
    rendered = ", ".join(f"{k}={v}" for k, v in settled.items())
    assert f"{loadstone.__version__}), readers=3, chunk_bytes=2.00 MiB, {rendered}" in plan.report.render()
    result = loadstone.load(folder, placement="cpu", engine_options={"readers": 3, "reader": "pread"}, progress=False)
    assert any("3 pread reader threads" in n for n in result.report.notes)
    assert set(result.report.engine["timings"]) == {"skeleton", "stream", "finish", "stream_gb_per_s"}
    for options, field in [({"readers": 0}, "engine option readers"), ({"chunk_bytes": "1KB"}, "engine option chunk_bytes"),
                           ({"reader": "io_uring"}, "engine option reader"), ({"turbo": True}, "engine options"),
                           ({"reader": "instanttensor"}, "engine option reader")]:
        with pytest.raises(loadstone.OptionError) as info:
            loadstone.plan(folder, placement="cpu", engine_options=options)
        assert info.value.field == field, options
    with pytest.raises(loadstone.OptionError):  # the transformers engine takes reader=pread|mmap only
        loadstone.plan(folder, placement="cpu", engine="transformers", engine_options={"readers": 2})
    with pytest.raises(loadstone.OptionError) as info:
        loadstone.plan(folder, placement="cpu", engine="transformers", engine_options={"reader": "instanttensor"})
    assert info.value.field == "engine option reader" and "pread, mmap" in str(info.value)


@pytest.mark.parametrize("reader", [None, "pread", "mmap"])
def test_the_transformers_engine_reads_with_pread_unless_told_to_map(reader, tiny_checkpoint, same_weights,
                                                                    monkeypatch):
    """pread by default (a file truncated mid-load is an error, not SIGBUS: test_changed_files.py);
    reader=mmap gives from_pretrained its own memory map back, and the same model."""
    import transformers.modeling_utils as modeling_utils

    folder = str(tiny_checkpoint("llama"))
    opened, original = [], modeling_utils.safe_open

    def recording(filename, framework, device="cpu", **kwargs):
        opened.append(kwargs.get("backend"))
        return original(filename, framework, device=device, **kwargs)

    monkeypatch.setattr(modeling_utils, "safe_open", recording)
    options = {} if reader is None else {"reader": reader}
    result = loadstone.load(folder, placement="cpu", engine="transformers", engine_options=options, trainable=False,
                            progress=False)
    assert opened and set(opened) == {"mmap" if reader == "mmap" else "pread"}
    assert modeling_utils.safe_open is recording  # put back after the load
    assert any("reader=mmap" in n for n in result.report.notes) == (reader == "mmap")
    same_weights(result.model, loadstone.load(folder, placement="cpu", engine="loadstone", trainable=False,
                                              progress=False).model)


@pytest.mark.parametrize("chunk", ["1MiB", "3MiB"])
def test_chunked_reads_reassemble_every_tensor(tiny_checkpoint, tmp_path, same_weights, chunk):
    """Tensors larger than a chunk are read in pieces by several threads; the pieces must land in
    the right places (a 1 MiB chunk splits this model's embeddings and MLP weights)."""
    folder = str(tiny_checkpoint("llama", hidden_size=256, intermediate_size=1024, vocab_size=2048))
    native = loadstone.load(folder, placement="cpu", engine_options={"chunk_bytes": chunk, "readers": 4},
                            progress=False)
    reference = loadstone.load(folder, placement="cpu", engine="transformers", progress=False)
    same_weights(native.model, reference.model)


def test_host_scratch_goes_back_to_the_system_when_the_tensor_dies():
    import torch

    from loadstone.engines.streaming import host_scratch
    from loadstone.telemetry import current_rss

    before = current_rss()
    scratch = host_scratch((16, 1 << 20), torch.float32, 64 << 20)
    scratch.fill_(1.0)  # every page touched
    assert scratch.shape == (16, 1 << 20) and float(scratch.sum()) == 16 * (1 << 20)
    grown = current_rss() - before
    del scratch
    assert grown >= 60 << 20 and current_rss() - before < 8 << 20, (grown, current_rss() - before)


def test_transient_host_tensors_come_from_scratch_mappings(tiny_checkpoint, same_weights, monkeypatch):
    """Mixtral's experts are fused from per-expert tensors: each source passes through the host
    once, and comes from host_scratch (from any size here); the model equals the transformers
    engine's."""
    import loadstone.engines.streaming as streaming

    made = []
    real = streaming.host_scratch

    def counted(shape, dtype, nbytes):
        made.append(nbytes)
        return real(shape, dtype, nbytes)

    monkeypatch.setattr(streaming, "host_scratch", counted)
    monkeypatch.setattr(streaming, "SCRATCH_MIN_BYTES", 1)
    folder = str(tiny_checkpoint("mixtral"))
    plan = loadstone.plan(folder, placement="cpu")
    fused = [plan.inventory.tensors[s] for g in plan.tensor_map.groups if g.fused for s in g.sources]
    result = loadstone.load(folder, placement="cpu", progress=False)
    assert fused and sorted(made) == sorted(t.nbytes for t in fused)
    same_weights(result.model, loadstone.load(folder, placement="cpu", engine="transformers", progress=False).model)


@pytest.mark.parametrize("stored,wanted", [("bfloat16", "float32"), ("float32", "bfloat16"), ("float32", "float16"),
                                           ("bfloat16", "float16")])
def test_casts_on_the_cpu_happen_chunk_by_chunk_as_read(stored, wanted, tiny_checkpoint, same_weights, monkeypatch):
    """No full copy in the stored dtype: each 1 MiB chunk is cast into the final tensor as it is
    read (tensors of 1-4 MiB span several chunks), bit for bit what transformers' cast gives."""
    import loadstone.engines.streaming as streaming

    def refuse(*args):
        raise AssertionError("a CPU cast went through a full transient copy")

    monkeypatch.setattr(streaming, "host_scratch", refuse)
    monkeypatch.setattr(streaming, "SCRATCH_MIN_BYTES", 1)
    folder = str(tiny_checkpoint("llama", dtype=stored, hidden_size=512, intermediate_size=1024, vocab_size=4096))
    native = loadstone.load(folder, placement="cpu", dtype=wanted, engine_options={"chunk_bytes": "1MiB"},
                            progress=False)
    assert {str(p.dtype) for p in native.model.parameters()} == {f"torch.{wanted}"}
    same_weights(native.model, loadstone.load(folder, placement="cpu", dtype=wanted, engine="transformers",
                                              progress=False).model)


def test_finishing_initialises_only_what_was_not_loaded(tiny_checkpoint, monkeypatch):
    """The native engine marks every fully loaded module, so transformers' initialiser calls
    ``_init_weights`` only where something is left to fill: rotary frequencies (a non-persistent
    buffer), a new task head, and the modules above them. The head is still initialised."""
    from transformers.models.llama.modeling_llama import LlamaPreTrainedModel

    from loadstone.engines.finish import mark_loaded

    folder = str(tiny_checkpoint("llama"))  # written (and initialised) before the count starts
    called: list[str] = []
    original = LlamaPreTrainedModel._init_weights

    def counted(self, module):
        called.append(type(module).__name__)
        return original(self, module)

    monkeypatch.setattr(LlamaPreTrainedModel, "_init_weights", counted)
    result = loadstone.load(folder, task="sequence-classification", placement="cpu",
                            engine="loadstone", progress=False)
    model = result.model
    assert sorted(called) == sorted(["LlamaRotaryEmbedding", "Linear", "LlamaModel", "LlamaForSequenceClassification"])
    head = model.score.weight
    assert head.isfinite().all() and 0 < head.std() < 3 * model.config.initializer_range
    assert all(getattr(m, "_is_hf_initialized", False) for m in model.modules())

    # the marking itself: a module counts as loaded only when its whole subtree is
    root = torch.nn.Module()
    root.loaded = torch.nn.Linear(2, 2)
    root.pending = torch.nn.Module()
    root.pending.register_buffer("frequencies", torch.empty(2, device="meta"), persistent=False)
    root.parent = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    mark_loaded(root, {"parent.1.weight"})
    marked = {name for name, m in root.named_modules() if getattr(m, "_is_hf_initialized", False)}
    assert marked == {"loaded", "parent.0"}
    assert root.parent[1].bias._is_hf_initialized and not hasattr(root.parent[1].weight, "_is_hf_initialized")


def test_the_block_reserved_for_kept_tensors_is_what_torchs_large_pool_hands_out():
    """torch's large pool takes tensors above 1 MiB, each rounded up to 512 bytes; smaller ones come
    from its small pool, which the block does not serve (tests/test_gpu_device_memory.py checks the
    block against a real allocator: one segment for the whole load, almost nothing left unused)."""
    from loadstone.engines.device_memory import kept_bytes

    MiB = 1 << 20
    assert kept_bytes([4096, MiB]) == 0
    assert kept_bytes([MiB + 1]) == MiB + 512
    assert kept_bytes([2 * MiB, 3 * MiB + 511, 4096]) == 2 * MiB + 3 * MiB + 512
