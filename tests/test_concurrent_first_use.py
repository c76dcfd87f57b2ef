"""Loads started at the same moment in a fresh process (transformers not yet imported) all succeed."""

import json
import subprocess
import sys

SCRIPT = r"""
import json, sys, threading
import loadstone
assert "transformers" not in sys.modules
folder = sys.argv[1]
errors, barrier = [], threading.Barrier(4)
def work():
    barrier.wait()
    try:
        loadstone.load(folder, placement="cpu", progress=False, trainable=False)
    except BaseException as exc:
        errors.append(f"{type(exc).__name__}: {exc}")
threads = [threading.Thread(target=work) for _ in range(4)]
[t.start() for t in threads]; [t.join() for t in threads]
print(json.dumps(errors))
"""


def test_four_threads_first_load_in_a_fresh_process(tiny_checkpoint):
    folder = tiny_checkpoint("llama")
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(folder)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
