python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD/core:$PWD/plugins/loadstone-bnb
df -h /tmp . | tail -2; grep -E " /tmp | / " /proc/mounts
timeout 180 python3 -m pytest -q -p loadstone.pytest_plugin -p no:cacheprovider tests/test_gpu_direct_io.py tests/test_gpu_read_ahead.py tests/test_gpu.py plugins/loadstone-bnb/tests/test_gpu.py > $OUT/gpu_tests.log 2>&1; echo tests rc $?
tail -15 $OUT/gpu_tests.log
timeout 380 python3 bench/gpu_engines.py $OUT/bench --repeat 3 --rows instanttensor_buffered,loadstone_native_bf16,loadstone_native_bf16_c8,loadstone_native_bf16_it16,loadstone_native_nf4 2>&1 | tail -9
