export PYTHONPATH=/tmp/site:$PWD/core:$PWD/plugins/loadstone-bnb
timeout 500 python3 bench/gpu_engines.py $OUT/bench --repeat 4 --rows instanttensor_buffered,loadstone_native_bf16,loadstone_native_bf16_ahead16,loadstone_native_bf16_noahead 2>&1 | tail -6
