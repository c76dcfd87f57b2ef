"""One torchrun process of test_fsdp.py (gloo on the CPU, NCCL with one GPU per process in
test_gpu.py): FSDP loads through the ``fsdp`` engine, checked against a plain load in the same
process, then LoRA training with FSDP2. Writes what it saw to OUT/rank<N>.json.

    fsdp_worker.py CHECKPOINT OUT
"""

import gc
import json
import os
import sys

import torch
import torch.distributed as dist

import loadstone
from loadstone_devicemap import shard_model

checkpoint, out = sys.argv[1], sys.argv[2]
backend = "nccl" if torch.cuda.is_available() else "gloo"
if backend == "nccl":
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
dist.init_process_group(backend)
rank, world = dist.get_rank(), dist.get_world_size()
device = torch.device(f"cuda:{rank}" if backend == "nccl" else "cpu")


plugins = loadstone.PluginManager()
NF4 = {"quantization": "nf4", "quantization_options": {"quant_storage": "bfloat16", "upcast": False}}
seen = {"rank": rank, "world": world}


def local(param):
    from torch.distributed.tensor import DTensor

    return param.to_local() if isinstance(param, DTensor) else param


def check(name, kwargs, source="each"):
    result = loadstone.load(checkpoint, placement="fsdp", dtype="bfloat16", progress=False, plugins=plugins,
                            engine_options={"source": source}, **kwargs)
    # the same load on one device (trainable too: bitsandbytes then picks the same CPU kernel)
    reference = loadstone.load(checkpoint, placement="cpu" if backend == "gloo" else f"cuda:{rank}",
                               dtype="bfloat16", progress=False, plugins=plugins, **kwargs).model
    model = result.model
    params = dict(model.named_parameters())
    full = sum(p.numel() for p in reference.parameters())
    held = sum(local(p).numel() for p in params.values())
    ids = (torch.arange(16).reshape(2, 8) * (rank + 3) % 300).to(device)
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    model = shard_model(get_peft_model(model, lora))
    torch.manual_seed(0)
    reference = get_peft_model(reference, lora)
    with torch.no_grad():
        ours, theirs = model(input_ids=ids).logits, reference(input_ids=ids).logits
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    losses = []
    model.train()
    for _ in range(6):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    gathered = [None] * world
    lora_b = next(p for n, p in model.named_parameters() if "lora_B" in n)
    dist.all_gather_object(gathered, local(lora_b).detach().float().cpu().tolist())
    seen[name] = {
        "engine": result.report.engine["name"], "options": result.report.engine["options"],
        "placement": result.report.placement,
        "same_logits": torch.equal(ours, theirs), "max_diff": float((ours.float() - theirs.float()).abs().max()),
        "held": held, "full": full, "dtensors": all(type(p).__name__ == "DTensor" for p in params.values()),
        "losses": losses, "trainable": sorted({n.split(".")[-2] for n, p in model.named_parameters() if p.requires_grad}),
        "memory": result.report.memory, "notes": result.report.notes,
        "lora_b_shards_differ": gathered[0] != gathered[1],
    }


check("nf4", NF4)
check("bf16", {})
check("nf4_rank0", NF4, source="rank0")
with open(f"{out}/rank{rank}.json", "w") as fh:
    json.dump(seen, fh, default=str)
gc.collect()  # free the FSDP models (reference cycles) while the process group is alive
dist.barrier()  # nobody tears its connections down while a peer still uses them
dist.destroy_process_group()
