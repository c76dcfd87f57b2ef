export PYTHONPATH=/tmp/site:$PWD/core:$PWD/plugins/loadstone-bnb
timeout 560 python3 bench/gpu_engines.py $OUT/bench --repeat 2 --rows cold_disk_read,cold_transformers_bf16,cold_loadstone_native_bf16,cold_loadstone_native_bf16_buffered 2>&1 | tail -8
