"""What a benchmark row measures besides wall time: its process's peak host RSS, the device
memory it added (all of it, not only torch's allocator's), and a page cache dropped for the cold
rows. Used by gpu_engines.py; each row runs in a process of its own."""

from __future__ import annotations

import json
import os
import resource
import sys


def peak_rss_bytes(field: str = "VmHWM") -> int:
    """This process's own peak RSS (VmHWM: unlike ru_maxrss it starts afresh at exec), or with
    ``field="VmRSS"`` its RSS now."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def drop_page_cache() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3\n")
        return True
    except OSError:
        return False


class DevicePeak:
    """The most device memory this process added since it was made: ``cudaMemGetInfo`` sampled
    every 2 ms on a thread of its own. The e2e rows' clock starts before CUDA does: for them the
    baseline is taken at the first sample, so CUDA's own context is not counted there either."""

    def __init__(self, device: str):
        import threading

        self.device, self.peak = device, 0
        self.base = self._used()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _used(self) -> int | None:
        torch = sys.modules.get("torch")  # never imported here: an e2e row's clock counts its import
        try:
            if torch is None or not torch.cuda.is_initialized():
                return None  # an e2e row before its load starts CUDA: nothing of this load there yet
            free, total = torch.cuda.mem_get_info(self.device)
        except Exception:  # torch half-imported by the main thread
            return None
        return total - free

    def _watch(self) -> None:
        while True:
            used = self._used()
            if used is not None:
                self.base = used if self.base is None else self.base
                self.peak = max(self.peak, used - self.base)
            if self.done.wait(0.002):
                return

    def stop(self) -> int:
        self.done.set()
        self.thread.join()
        used = self._used()
        if used is not None and self.base is not None:
            self.peak = max(self.peak, used - self.base)
        return self.peak


def files_of(ckpt: str) -> list[str]:
    """The checkpoint's safetensors files, sorted."""
    return sorted(os.path.join(ckpt, f) for f in os.listdir(ckpt) if f.endswith(".safetensors"))


def warm_page_cache(files: list[str]) -> None:
    """Reads every byte of ``files`` once, so that warm measurements start from the page cache."""
    for path in files:
        with open(path, "rb", buffering=0) as fh:
            while fh.read(64 << 20):
                pass


def import_model_code(ckpt: str) -> None:
    """Imports the checkpoint's configuration and model classes (transformers' modelling modules
    for its ``model_type``), as ``from transformers import LlamaForCausalLM`` does."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    with open(os.path.join(ckpt, "config.json")) as fh:
        model_type = json.load(fh)["model_type"]
    transformers.CONFIG_MAPPING[model_type]
    getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])


# What a load imports, for compile_sources' probe: the rows' libraries, and the modules a load of
# the benchmarks' Llama checkpoint imports on its way (transformers' modelling code imports psutil,
# tokenizers and more through its generation utilities).
LOAD_IMPORTS = ("torch", "transformers", "transformers.models.llama.modeling_llama", "bitsandbytes", "loadstone",
                "loadstone.api", "loadstone.engines.native", "loadstone.engines.instant", "loadstone.engines.streaming",
                "loadstone.stages.plan", "loadstone_bnb", "loadstone_bnb.plugin", "instanttensor", "fastsafetensors",
                "safetensors.torch", "peft", "accelerate")
_PROBE = """
import importlib, json, sys
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except Exception:
        pass
print(json.dumps(sorted({m.__file__ for m in list(sys.modules.values())
                         if isinstance(getattr(m, "__file__", None), str) and m.__file__.endswith(".py")
                         and m.__file__.startswith("/")})))
"""


def compile_sources(imports: tuple[str, ...] = LOAD_IMPORTS) -> list[str]:
    """Byte-compile every library the rows import, once, before any row, and return the imported
    sources still without bytecode (folders it cannot write). A module without bytecode is compiled
    at every import where PYTHONDONTWRITEBYTECODE is set (the GPU machine sets it): that charged
    each row 0.25 s for transformers' Llama modules when the wheels were installed with
    ``pip --no-compile``, charges an editable install (loadstone) at every run, and charged each
    load 55 ms for psutil, which transformers' modelling code imports. A user's pip install
    compiles; the benchmark measures that. A fresh process imports ``imports`` and lists
    every source file it loaded; those, and the named packages' whole folders (for what only some
    rows import), are compiled."""
    import compileall
    import importlib.util
    import subprocess

    for name in ("loadstone", "loadstone_bnb", "loadstone_gptq", "loadstone_devicemap", "transformers",
                 "bitsandbytes", "instanttensor", "fastsafetensors", "peft", "accelerate", "safetensors",
                 "huggingface_hub", "tokenizers", "packaging", "psutil"):
        spec = importlib.util.find_spec(name)
        for folder in (spec.submodule_search_locations or []) if spec else []:
            if os.access(folder, os.W_OK):
                compileall.compile_dir(folder, quiet=2, workers=os.cpu_count() or 1)
    probe = subprocess.run([sys.executable, "-c", _PROBE, *imports], capture_output=True, text=True)
    sources = json.loads(probe.stdout.splitlines()[-1]) if probe.returncode == 0 and probe.stdout else []
    missing = []
    for path in sources:
        if os.access(os.path.dirname(path), os.W_OK):
            compileall.compile_file(path, quiet=2)
        if not os.path.exists(importlib.util.cache_from_source(path)):
            missing.append(path)
    if missing:
        print(f"{len(missing)} imported sources have no bytecode and are compiled at each import "
              f"(e.g. {missing[0]})", file=sys.stderr)
    return missing


def delay_load_weights(seconds: float) -> None:
    """An ablation, not an option: the kernel's weight-loading stage starts ``seconds`` late, so a
    read-ahead has read all it can before the engine takes its first tensor, and the engine's
    ``stream`` time is the cost of emptying a full ring (what a load pays where its plan ends late)."""
    import time

    import loadstone.pipeline as pipeline

    load_weights = pipeline.load_weights

    def late(*args, **kwargs):
        time.sleep(seconds)
        return load_weights(*args, **kwargs)

    pipeline.load_weights = late


def reserve_before_read_ahead() -> None:
    """An ablation, not an option: the native engine's one-block reservation in torch's cache
    (``engines.device_memory``) made before its read-ahead opens instanttensor, for the whole
    checkpoint as stored, instead of at the start of the engine's stage, while the readers run."""
    import loadstone.engines.native as native
    from loadstone.engines.device_memory import kept_bytes, reserve_in_torch_cache

    read_ahead = native.NativeEngine.read_ahead

    def reserving(self, request, inventory, device):
        if device.startswith("cuda"):
            reserve_in_torch_cache(device, kept_bytes(info.nbytes for info in inventory.tensors.values()))
        return read_ahead(self, request, inventory, device)

    native.NativeEngine.read_ahead = reserving


def skip_reservation() -> None:
    """An ablation, not an option: the native engine without its one-block reservation in torch's
    cache (``engines.device_memory.reserve_kept``)."""
    import loadstone.engines.native as native

    native.reserve_kept = lambda items: None


#: The ``ablate=`` values of ``gpu_engines.py``'s rows: measurements of the engine's parts, not options.
ABLATIONS = {"reserve": skip_reservation, "late_plan": lambda: delay_load_weights(0.5),
             "early_reserve": reserve_before_read_ahead}
