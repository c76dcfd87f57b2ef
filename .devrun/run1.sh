python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD/core:$PWD/plugins/loadstone-bnb
timeout 180 python3 -m pytest -q -p loadstone.pytest_plugin -p no:cacheprovider tests/test_gpu_direct_io.py tests/test_gpu_read_ahead.py tests/test_gpu.py plugins/loadstone-bnb/tests/test_gpu.py > $OUT/gpu_tests.log 2>&1; echo tests rc $?
tail -6 $OUT/gpu_tests.log
timeout 330 python3 bench/gpu_engines.py $OUT/bench --repeat 2 --rows cold_disk_read,cold_loadstone_native_bf16,cold_loadstone_native_bf16_d64,cold_transformers_bf16 2>&1 | tail -6
