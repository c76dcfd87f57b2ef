#!/usr/bin/env bash
# FSDP-QLoRA on two GPUs, one run: the example fine-tunes LoRA on a 1.1B Llama-shaped model
# (random weights, NF4 with quant_storage=bfloat16) with FSDP2 over two processes; the loading
# benchmark compares where each process's bytes come from; the GPU tests of loadstone-devicemap
# (even / layers:N / file maps over two GPUs through both engines, FSDP with NCCL) run last.
# Per-rank peak host RSS and GPU memory land in bench/results/:
#   h200x2_fsdp_qlora_<date>.json        the example (load and training peaks per rank, losses)
#   h200x2_fsdp_loading_<date>.json      bench/fsdp_loading.py --size medium --nproc 2
#   h200x2_devicemap_gpu_tests_<date>.log
#
# Run from the repository root on a machine with two GPUs:
#   bash bench/gpu_fsdp_qlora.sh
# Needs python3 with torch (CUDA), transformers, peft, accelerate, safetensors, pluggy, pyyaml;
# bitsandbytes installed or as a wheel in .whl/ (see shared/gpu.md). The kernel and both plugins
# are installed into /tmp/site (no network needed) so that their entry points register.
set -euo pipefail
cd "$(dirname "$0")/.."
DATE=$(date +%F)
OUT=bench/results
SITE=/tmp/loadstone-site
mkdir -p "$OUT" "$SITE"

wheels=(); for w in .whl/*.whl; do [ -e "$w" ] && wheels+=("$w"); done
python3 -m pip install -q --no-index --no-deps --no-compile --no-build-isolation --target "$SITE" \
    ${wheels[@]+"${wheels[@]}"} . plugins/loadstone-bnb plugins/loadstone-devicemap
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
python3 -c "import loadstone, loadstone_bnb, loadstone_devicemap, bitsandbytes; \
m = loadstone.PluginManager(); m.engine('fsdp'); m.quantization_backend('nf4'); print('plugins registered')"
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader

# 1. the example: a 1.1B Llama shape (built once by bench/fsdp_loading.py)
CKPT=$(python3 bench/fsdp_loading.py /tmp/fsdp-loading --size medium --checkpoint-only | tail -1)
python3 -m torch.distributed.run --standalone --nproc-per-node 2 examples/fsdp_qlora.py \
    --model "$CKPT" --steps 20 --seq-len 256 --report "$OUT/h200x2_fsdp_qlora_$DATE.json"
# the tiny default model too (what CI runs on the CPU), for the loss curve
python3 -m torch.distributed.run --standalone --nproc-per-node 2 examples/fsdp_qlora.py \
    --report "$OUT/h200x2_fsdp_qlora_tiny_$DATE.json"

# 2. loading: each process reads vs process 0 broadcasts vs one full copy per process
python3 bench/fsdp_loading.py /tmp/fsdp-loading --size medium --nproc 2
cp /tmp/fsdp-loading/fsdp_loading.json "$OUT/h200x2_fsdp_loading_$DATE.json"

# 3. the GPU tests
python3 -m pytest -q -p no:cacheprovider -rA -m gpu plugins/loadstone-devicemap/tests/test_gpu.py \
    2>&1 | tee "$OUT/h200x2_devicemap_gpu_tests_$DATE.log"
