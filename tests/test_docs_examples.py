"""The documentation is tested (docs/CONTRIBUTING.md, "Documentation examples are tests").

* Every fenced ```python block in docs/*.md, README.md and the example plugin's README runs in a
  fresh namespace with a temporary current directory, offline, on the CPU, in this process (so
  torch and transformers are imported once). ```python notest blocks are skipped.
* Every ```console block runs its ``$ `` commands unless fenced ```console notest. ``loadstone
  ...`` and ``python -m loadstone.testing ...`` run in-process through their ``main()``; anything
  else (pipes, redirections, other programs) runs in bash with the venv's bin first on PATH.
* A block fenced with ``file=PATH`` (```python file=docs/examples/x.py) is an excerpt: it is not
  run, and PATH must contain its text verbatim, so tutorials cannot drift from the real code.
* The example plugin is installed as a real distribution and used through its entry points.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Iterator, NamedTuple

import pytest

import loadstone

sys.path.insert(0, str(Path(__file__).parent))  # tests/ is not a package (--import-mode=importlib)
from docs_support import (  # noqa: E402
    BIN,
    Block,
    EXAMPLE,
    EXAMPLE_DIST,
    EXAMPLE_ENV,
    NEEDS_EXAMPLE_PLUGIN,
    ROOT,
    all_blocks,
    documents,
    runnable,
    _FENCE,
)


@pytest.fixture(scope="session")
def example_site(tmp_path_factory) -> Path:
    """The example plugin installed as a real distribution into a temporary folder (once)."""
    root = tmp_path_factory.mktemp("example-plugin")
    source = root / "src"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    site = root / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--disable-pip-version-check", "--target", str(site), str(source)],
                   check=True, capture_output=True, text=True, timeout=300)
    return site


def subprocess_env(extra_path: Path | None = None, **env: str) -> dict[str, str]:
    out = {**os.environ, **EXAMPLE_ENV, **env, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    out.pop("LOADSTONE_PLUGINS", None)
    out.pop("LOADSTONE_DISABLE_PLUGINS", None)
    if extra_path is not None:
        out["PYTHONPATH"] = os.pathsep.join(p for p in (str(extra_path), os.environ.get("PYTHONPATH")) if p)
    return out


# ------------------------------------------------------------------ the example plugin, for real
# These tests come first in the file: the two slow subprocesses (a real load through the entry
# points, and the example's own test suite) start in the background at the first test and run
# while the documentation examples run in this process.


_END_TO_END = r"""
import json
from pathlib import Path
import loadstone
from loadstone.testing import make_checkpoint

make_checkpoint("llama", "models/tiny-llama")
Path("models.toml").write_text('[models.tiny-llama]\npath = "models/tiny-llama"\nowner = "platform"\n')
result = loadstone.load("catalog://tiny-llama", placement="memory-fraction:0.9", progress=False)
try:
    loadstone.load("catalog://tiny-lama", progress=False)
except loadstone.ResolutionError as exc:
    error = str(exc)
print(json.dumps({"report": result.report.to_dict(), "error": error}, default=str))
"""


class Background(NamedTuple):
    process: subprocess.Popen
    cwd: Path
    output: Path

    def finish(self) -> tuple[int, str]:
        code = self.process.wait(timeout=600)
        return code, self.output.read_text(encoding="utf-8", errors="replace")


@pytest.fixture(scope="session")
def example_runs(example_site: Path, tmp_path_factory) -> Iterator[dict[str, Background]]:
    runs: dict[str, Background] = {}

    def start(key: str, argv: list[str], cwd: Path, **env: str) -> None:
        output = cwd / f"{key}.out"
        with open(output, "w") as sink:  # a file, not a pipe: nobody reads until the end
            process = subprocess.Popen(argv, cwd=cwd, env=subprocess_env(example_site, **env), stdout=sink,
                                       stderr=subprocess.STDOUT if key == "suite" else subprocess.DEVNULL)
        runs[key] = Background(process, cwd, output)

    start("load", [sys.executable, "-c", _END_TO_END], tmp_path_factory.mktemp("example-load"),
          LOADSTONE_CATALOG="models.toml", LOADSTONE_AUDIT_LOG="audit.jsonl")
    tests = example_site.parent / "src" / "tests"
    start("suite", [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore",
                    f"--basetemp={tmp_path_factory.mktemp('example-suite')}", str(tests)], tests.parent)
    yield runs
    for run in runs.values():
        if run.process.poll() is None:
            run.process.kill()
            run.process.wait()


def test_example_plugin_is_listed_with_its_distribution(example_site: Path, example_runs) -> None:
    done = subprocess.run([str(BIN / "loadstone"), "plugins", "--json"], env=subprocess_env(example_site),
                          capture_output=True, text=True, timeout=120, check=True)
    records = {r["name"]: r for r in json.loads(done.stdout) if r["distribution"] == EXAMPLE_DIST}
    assert set(records) == {"example-catalog", "example-audit", "example-placement"}, done.stdout
    for record in records.values():
        assert (record["version"], record["status"], record["builtin"]) == ("0.1.0", "loaded", False), record
    components = {(c["kind"], c["name"]) for r in records.values() for c in r["components"]}
    assert components == {("resolver", "catalog"), ("placement", "memory-fraction")}
    # The allow list takes the distribution name spelled any way pip accepts.
    env = subprocess_env(example_site, LOADSTONE_PLUGINS="Loadstone_Example.Plugin")
    done = subprocess.run([str(BIN / "loadstone"), "plugins", "--json"], env=env, capture_output=True, text=True,
                          timeout=120, check=True)
    statuses = {r["name"]: r["status"] for r in json.loads(done.stdout) if r["distribution"] == EXAMPLE_DIST}
    assert set(statuses.values()) == {"loaded"}, statuses


# ------------------------------------------------------------------ running examples


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("demo-cache") / "demo"


@contextlib.contextmanager
def example_sandbox(block: Block, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Path | None]:
    """Temporary cwd, example environment, a fresh plugin manager; everything restored afterwards."""
    saved_env, saved_path, saved_cwd = dict(os.environ), list(sys.path), os.getcwd()
    site = request.getfixturevalue("example_site") if block.doc in NEEDS_EXAMPLE_PLUGIN else None
    os.environ.update(EXAMPLE_ENV)
    # One demo checkpoint for the whole session: `loadstone demo` builds it once.
    os.environ["LOADSTONE_DEMO_DIR"] = str(request.getfixturevalue("demo_dir"))
    for name in ("LOADSTONE_PLUGINS", "LOADSTONE_DISABLE_PLUGINS", "LOADSTONE_STRICT_PLUGINS"):
        os.environ.pop(name, None)
    if site is not None:
        sys.path.insert(0, str(site))
    os.chdir(tmp_path)
    loadstone.reset_plugin_manager()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield site
    finally:
        os.chdir(saved_cwd)
        sys.path[:] = saved_path
        os.environ.clear()
        os.environ.update(saved_env)
        loadstone.reset_plugin_manager()


@pytest.mark.parametrize("block", runnable("python"))
def test_python_example_runs(block: Block, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    # Leading newlines make tracebacks point at the Markdown file's own line numbers.
    code = compile("\n" * (block.line - 1) + block.text, str(ROOT / block.doc), "exec")
    with example_sandbox(block, tmp_path, request):
        exec(code, {"__name__": "__docs__"})


_SHELL_ONLY = re.compile(r"[|&;<>$`(){}*?~]")


def _commands(block: Block) -> Iterator[tuple[int, str]]:
    lines = block.text.splitlines()
    n = 0
    while n < len(lines):
        if not lines[n].startswith("$ "):
            n += 1
            continue
        start, command = n, lines[n][2:]
        while command.endswith("\\") and n + 1 < len(lines):
            n += 1
            command = command[:-1] + " " + lines[n].strip()
        yield block.line + start, command
        n += 1


def _in_process(main, argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse: --help, usage errors
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return code or 0, out.getvalue()


def run_command(command: str, block_env: dict[str, str], cwd: Path, site: Path | None) -> tuple[int, str]:
    tokens = shlex.split(command, comments=True)
    if not _SHELL_ONLY.search(command) and tokens:
        assignments = {}
        while tokens and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", tokens[0]):
            key, _, value = tokens.pop(0).partition("=")
            assignments[key] = value
        if tokens and tokens[0] == "export":
            block_env.update(t.partition("=")[::2] for t in tokens[1:])
            return 0, ""
        main = None
        if tokens and tokens[0] == "loadstone":
            from loadstone.cli import main
            argv = tokens[1:]
        elif tokens[:3] in (["python", "-m", "loadstone.testing"], ["python3", "-m", "loadstone.testing"]):
            from loadstone.testing import main
            argv = tokens[3:]
        if main is not None:
            saved = dict(os.environ)
            os.environ.update({**block_env, **assignments})
            loadstone.reset_plugin_manager()
            try:
                return _in_process(main, argv)
            finally:
                os.environ.clear()
                os.environ.update(saved)
                loadstone.reset_plugin_manager()
    done = subprocess.run(["bash", "-o", "pipefail", "-c", command], cwd=cwd, env=subprocess_env(site, **block_env),
                          capture_output=True, text=True, timeout=300)
    return done.returncode, done.stdout + done.stderr


@pytest.mark.parametrize("block", runnable("console"))
def test_console_example_runs(block: Block, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    commands = list(_commands(block))
    assert commands, f"{block.id}: a console block without '$ ' commands; fence it as another language"
    block_env: dict[str, str] = {}
    with example_sandbox(block, tmp_path, request) as site:
        for line, command in commands:
            code, output = run_command(command, block_env, tmp_path, site)
            assert code == 0, f"{block.doc}:{line}: `$ {command}` exited with {code}:\n{output[-3000:]}"


@pytest.mark.parametrize("block", [pytest.param(b, id=b.id) for b in all_blocks() if b.flag("file")])
def test_excerpt_matches_its_file(block: Block) -> None:
    path = ROOT / block.flag("file")
    assert path.is_file(), f"{block.id}: file={block.flag('file')} does not exist"
    assert textwrap.dedent(block.text).strip() in path.read_text(encoding="utf-8"), (
        f"{block.id}: this excerpt is no longer in {block.flag('file')}; copy the current code into the docs")


def test_fences_are_closed_and_labelled() -> None:
    for path in documents():
        if not path.is_file():
            continue
        fences = [n + 1 for n, line in enumerate(path.read_text(encoding="utf-8").splitlines()) if _FENCE.match(line)]
        assert len(fences) % 2 == 0, f"{path.relative_to(ROOT)}: an unclosed code fence (fences at lines {fences})"
    unlabelled = [b.id for b in all_blocks() if not b.lang]
    assert not unlabelled, f"code blocks without a language (write ```text for plain output): {unlabelled}"



def test_example_plugin_resolves_places_and_audits_through_entry_points(example_runs) -> None:
    code, output = example_runs["load"].finish()
    assert code == 0, output[-3000:]
    cwd = example_runs["load"].cwd
    out = json.loads(output.splitlines()[-1])
    report = out["report"]
    base = report["sources"]["base"]
    assert (base["kind"], base["resolver"], base["extra"]["owner"]) == ("catalog", "catalog", "platform")
    assert base["distribution"] == f"{EXAMPLE_DIST} 0.1.0"
    assert base["path"] == str((cwd / "models" / "tiny-llama").resolve())
    placement = next(d for d in report["decisions"] if d["topic"] == "placement")
    assert (placement["plugin"], placement["distribution"]) == ("example-placement", EXAMPLE_DIST)
    assert "did you mean 'tiny-llama'" in out["error"]
    lines = [json.loads(line) for line in (cwd / "audit.jsonl").read_text().splitlines()]
    assert [line["event"] for line in lines] == ["load", "load_failed"]
    assert lines[0]["reference"] == "catalog://tiny-llama" and lines[0]["parameters"]["total"] > 0
    assert (lines[1]["stage"], lines[1]["error"]) == ("resolve", "ResolutionError")


def test_example_plugin_own_test_suite_passes(example_runs) -> None:
    code, output = example_runs["suite"].finish()
    assert code == 0, output[-5000:]
