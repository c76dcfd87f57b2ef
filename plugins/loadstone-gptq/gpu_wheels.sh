#!/usr/bin/env bash
# Fill .whl/ (git-ignored, in the repository root) with what the plugin needs on a GPU machine that
# reaches no package index and already has torch, transformers, peft, accelerate and safetensors
# (see README.md, "On a GPU"). Python 3.12, manylinux x86_64. About 60 MB.
#   PY312=python3.12 plugins/loadstone-gptq/gpu_wheels.sh
# gptqmodel 7.6.0 and several of its dependencies publish no wheels: they are built here (pure
# Python, except pypcre, built with $PY312 and linked against the system's libpcre2-8.so.0).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${PYTHON:-.venv/bin/python}"
PY312="${PY312:-python3.12}"
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || grep -qx '/.whl/' .gitignore || echo '/.whl/' >> .git/info/exclude
"$PY" -m pip wheel -q --no-deps -w .whl gptqmodel==7.6.0 defuser==0.0.28 device-smi==0.5.7 logbar==0.4.15 \
    tokenicer==0.0.14
"$PY312" -m pip wheel -q --no-deps -w .whl pypcre==0.6.4
# importing gptqmodel imports datasets (and with it pandas and pyarrow); pyarrow 21 is the oldest
# gptqmodel accepts and 12 MB smaller than the newest.
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .whl optimum==2.3.0 torchao==0.18.0 threadpoolctl==3.8.0 datasets==5.2.0 \
    pyarrow==21.0.0 pandas==3.1.1 dill==0.4.1 multiprocess==0.70.19 xxhash==4.1.0 fsspec
rm -f .whl/pypcre-*-cp311-*.whl
du -sh .whl
