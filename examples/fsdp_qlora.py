"""Fine-tune LoRA adapters with FSDP2 on a 4-bit base model (FSDP-QLoRA), one process per GPU.

    torchrun --nproc-per-node 2 examples/fsdp_qlora.py                  # a tiny random Llama
    torchrun --nproc-per-node 2 examples/fsdp_qlora.py --model ./my-llama --steps 50
    torchrun --nproc-per-node 2 examples/fsdp_qlora.py --quantization none   # bf16 FSDP-LoRA

GPUs use NCCL; without CUDA the processes run on the CPU with gloo. Every process loads only its
shard of the base model (``placement="fsdp"``: the checkpoint is streamed one module at a time
and each process keeps 1/N of every tensor), peft adds LoRA to the attention projections,
``shard_model`` wraps each decoder layer and the model with ``fully_shard`` (the adapters become
FSDP parameters), and a few optimizer steps on a fixed batch per process show the loss going
down. ``--report PATH`` writes each process's peak host RSS and GPU memory (load and training)
as JSON. Needs loadstone, loadstone-bnb and loadstone-devicemap installed.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time

import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model

import loadstone
from loadstone_devicemap import shard_model


def tiny_model() -> str:
    """A small random Llama (4 layers), written once by process 0."""
    folder = os.path.join(tempfile.gettempdir(), f"loadstone-fsdp-example-{os.getuid()}")
    if dist.get_rank() == 0 and not os.path.exists(os.path.join(folder, "config.json")):
        from loadstone.testing import make_checkpoint

        make_checkpoint("llama", folder, dtype="bfloat16", num_hidden_layers=4)
    dist.barrier()
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a model folder or Hub id (default: a tiny random Llama)")
    parser.add_argument("--quantization", default="nf4", help="nf4 (default), fp4 or none")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--seq-len", type=int, default=16)
    parser.add_argument("--report", help="write per-process peak memory and the losses here (JSON)")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        train(args, cuda)
        # The FSDP model (its hooks form reference cycles) may still hold collectives' work
        # objects: free them while the process group and the interpreter are alive. Left to
        # interpreter shutdown, gloo's threads can abort the process (SIGABRT) after a good run.
        gc.collect()
        dist.barrier()  # nobody tears its connections down while a peer still uses them
    finally:
        dist.destroy_process_group()


def train(args: argparse.Namespace, cuda: bool) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")

    quantized = args.quantization != "none"
    started = time.perf_counter()
    result = loadstone.load(
        args.model or tiny_model(), placement="fsdp", dtype="bfloat16", progress=False,
        quantization=args.quantization,
        # FSDP shards the packed 4-bit weights as bf16 tensors, and keeps one dtype: no fp32 upcast
        quantization_options={"quant_storage": "bfloat16", "upcast": False} if quantized else {})
    load_seconds = time.perf_counter() - started
    if rank == 0:
        print(result.report.render())

    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(result.model, lora)
    shard_model(model)  # fully_shard each decoder layer (with its LoRA weights), then the model
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)

    # Each process its own batch of counting sequences (start, start + step, ...): learnable.
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(1234 + rank)
    starts = torch.randint(0, vocab, (4, 1), generator=generator)
    strides = torch.randint(1, 5, (4, 1), generator=generator)
    batch = ((starts + strides * torch.arange(args.seq_len)) % vocab).to(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    model.train()
    losses = []
    for step in range(args.steps):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(float(mean) / world)
        if rank == 0:
            print(f"step {step}: loss {losses[-1]:.4f}")

    mine = {"rank": rank, "load_seconds": round(load_seconds, 3),
            "load_peak_host_rss_bytes": result.report.memory["peak_host_rss_bytes"],
            "load_peak_device_bytes": result.report.memory["peak_device_bytes"],
            "train_peak_device_bytes": int(torch.cuda.max_memory_allocated()) if cuda else None,
            "shard_bytes": sum(p.to_local().numel() * p.element_size() for p in result.model.parameters())}
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)
    if rank == 0:
        for entry in everyone:
            print(json.dumps(entry))
        if args.report:
            os.makedirs(os.path.dirname(os.path.abspath(args.report)), exist_ok=True)
            with open(args.report, "w") as fh:
                json.dump({"world": world, "device": device.type, "quantization": args.quantization,
                           "model": args.model or "tiny random Llama (4 layers)", "losses": losses,
                           "torch": torch.__version__, "loadstone": loadstone.__version__,
                           "gpu": torch.cuda.get_device_name() if cuda else None, "ranks": everyone}, fh, indent=2)


if __name__ == "__main__":
    main()
