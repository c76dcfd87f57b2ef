"""``./dev test``, the command CI runs: the suite spread over the cores unless the caller says how to
run it, and a run that collects no test is a failure (pytest's exit status 5), never a green build."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VENV = Path(sys.prefix)
pytestmark = pytest.mark.slow


def dev(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "LOADSTONE_"))}
    # the environment these tests run in, as it is (./dev would rebuild it if a pyproject changed)
    env.update(LOADSTONE_VENV=str(VENV), LOADSTONE_DEV_SETUP="0")
    return subprocess.run([str(REPO / "dev"), *args, "-q", "-p", "no:cacheprovider", f"--basetemp={tmp_path / 'bt'}",
                           "tests/test_smoke.py"], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)


def test_the_suite_runs_in_parallel_by_default_and_no_test_is_a_failure(tmp_path):
    done = dev("test", "-k", "no_test_has_this_name", tmp_path=tmp_path)
    assert done.returncode == 5, done.stdout + done.stderr  # not 0: a filter that matches nothing fails CI
    assert "bringing up nodes" in done.stdout  # pytest-xdist workers


def test_the_callers_choice_of_workers_wins(tmp_path):
    done = dev("test", "-p", "no:xdist", "-k", "no_test_has_this_name", tmp_path=tmp_path)
    assert done.returncode == 5, done.stdout + done.stderr
    assert "bringing up nodes" not in done.stdout
