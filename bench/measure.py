"""What a benchmark row measures besides wall time: its process's peak host RSS, the device
memory it added (all of it, not only torch's allocator's), and a page cache dropped for the cold
rows. Used by gpu_engines.py; each row runs in a process of its own."""

from __future__ import annotations

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


def compile_sources() -> None:
    """Byte-compile every library the rows import, once, before any row: a package without
    bytecode is compiled at every import where PYTHONDONTWRITEBYTECODE is set (the GPU machine sets
    it), which charged each row 0.25 s for transformers' Llama modules when the wheels were installed
    with ``pip --no-compile``, and charges an editable install (loadstone) at every run. A user's
    pip install compiles; the benchmark measures that. Folders it cannot write are left as they are."""
    import compileall
    import importlib.util

    for name in ("loadstone", "loadstone_bnb", "loadstone_gptq", "loadstone_devicemap", "transformers",
                 "bitsandbytes", "instanttensor", "fastsafetensors", "peft", "accelerate", "safetensors",
                 "huggingface_hub", "tokenizers", "packaging"):
        spec = importlib.util.find_spec(name)
        for folder in (spec.submodule_search_locations or []) if spec else []:
            if os.access(folder, os.W_OK):
                compileall.compile_dir(folder, quiet=2, workers=os.cpu_count() or 1)
