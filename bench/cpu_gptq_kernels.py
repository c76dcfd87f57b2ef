"""gptqmodel's CPU kernels side by side on one GPTQ checkpoint: how exact each is, how fast, and
whether LoRA trains through it. The evidence behind loadstone-gptq's kernel choice.

Two checkpoints are packed from known integer codes by the plugin tests' independent reference,
on a Llama of the given width, so the exact weight of every layer is known: 4 bits, group size
32, one symmetric (v2 zero points) and one asymmetric with act-order (v1 zero points, what
auto-gptq wrote). For each checkpoint and kernel (``quantization_options={"backend": ...}``):

* ``weight_error``: the largest ``|W_kernel - W_exact| / max|W_exact|`` over the layers, where
  ``W_kernel`` is read through the layer's own forward (identity matrix in) and ``W_exact`` is the
  reference rounded to float16 once (what a lossless fp16 dequantization gives);
* ``logits_rel_l2`` against the same model stored unquantized;
* ``forward_s``: median of 5 forwards of 4 x 128 tokens, float32 activations;
* ``lora``: one LoRA step on a trainable load: "trains" (gradients only on the adapter), or the error;
* ``load``: the error, where loadstone refuses the kernel for this checkpoint.

Usage: ``python bench/cpu_gptq_kernels.py OUTDIR [--hidden 256]``; writes OUTDIR/cpu_gptq_kernels.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("GPTQMODEL_DISABLE_PACK_EXT", "1")
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # first-forward compile would dominate the timings

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins" / "loadstone-gptq" / "tests"))

KERNELS = ["gptq_torch", "gptq_torch_aten", "gptq_torch_fused", "gptq_torch_int8"]
CHECKPOINTS = {"sym-v2": dict(desc_act=False, sym=True, v1=False),
               "asym-actorder-v1": dict(desc_act=True, sym=False, v1=True)}


def measure(folder, adapter, kernel, exact, ids, want) -> dict:
    import torch
    from gptq_support import layer_weight

    import loadstone

    row: dict = {}
    try:
        result = loadstone.load(str(folder), placement="cpu", trainable=False, progress=False,
                                quantization_options={"backend": kernel})
    except loadstone.LoadstoneError as exc:
        return {"load": f"refused ({type(exc).__name__}): {exc.message[:200]}"}
    model = result.model
    row["class"] = result.report.quantization["kernel"]["class"]
    errors = []
    for layer, weight in exact.items():
        got = layer_weight(model.get_submodule(layer))
        errors.append(((got - weight.half().float()).abs().max() / weight.abs().max()).item())
    row["weight_error"] = max(errors)
    timings = []
    with torch.no_grad():
        for _ in range(5):
            start = time.perf_counter()
            got = model(ids).logits
            timings.append(time.perf_counter() - start)
    row["forward_s"] = round(statistics.median(timings), 4)
    row["logits_rel_l2"] = ((got.float() - want).norm() / want.norm()).item()
    try:
        trained = loadstone.load(str(adapter), base=str(folder), placement="cpu", progress=False,
                                 quantization_options={"backend": kernel}).model
        trained.train()
        trained(input_ids=ids[:1, :32], labels=ids[:1, :32]).loss.backward()
        with_grad = [n for n, p in trained.named_parameters() if p.grad is not None]
        row["lora"] = "trains" if with_grad and all("lora_" in n for n in with_grad) else f"grads: {with_grad[:3]}"
    except loadstone.LoadstoneError as exc:
        row["lora"] = f"refused ({type(exc).__name__}): {exc.message[:160]}"
    return row


def main() -> None:
    import torch
    from gptq_reference import write_gptq_checkpoint, write_plain_twin

    import loadstone
    from loadstone.testing import make_checkpoint, make_lora_adapter

    parser = argparse.ArgumentParser()
    parser.add_argument("outdir")
    parser.add_argument("--hidden", type=int, default=256)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gptq-kernels-"))
    plain = make_checkpoint("llama", work / "plain", hidden_size=args.hidden, intermediate_size=2 * args.hidden)
    ids = torch.randint(0, 320, (4, 128), generator=torch.Generator().manual_seed(0))
    rows = []
    for name, layout in CHECKPOINTS.items():
        exact = write_gptq_checkpoint(plain, work / name, bits=4, group_size=32, legacy=False, **layout)
        twin = write_plain_twin(work / name, work / f"{name}-twin", {k: w.half() for k, w in exact.items()})
        adapter = make_lora_adapter(twin, work / f"{name}-lora")
        reference = loadstone.load(str(twin), placement="cpu", trainable=False, progress=False).model
        with torch.no_grad():
            want = reference(ids).logits
        for kernel in KERNELS:
            row = {"checkpoint": name, "kernel": kernel, **measure(work / name, adapter, kernel, exact, ids, want)}
            rows.append(row)
            print(json.dumps(row))
    out = Path(args.outdir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"hidden": args.hidden, "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "checkpoints": CHECKPOINTS}
    (out / "cpu_gptq_kernels.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
