"""The documentation is complete (docs/CONTRIBUTING.md): every hook, component method and
value-object field in docs/hooks.md, every ``loadstone.__all__`` name in docs/api.md, every CLI
command and option in docs/cli.md; every hook is named by at least one test; relative links and
anchors resolve."""

from __future__ import annotations

import dataclasses
import inspect
import re
import sys
from pathlib import Path

import pytest

import loadstone
from loadstone.contract import hookspecs

sys.path.insert(0, str(Path(__file__).parent))  # tests/ is not a package (--import-mode=importlib)
from docs_support import (  # noqa: E402
    DOCS,
    ROOT,
    documents,
    section,
    sections,
    signature_text,
    _FENCE,
)


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    out, in_fence = set(), False
    for line in path.read_text(encoding="utf-8").splitlines():
        if _FENCE.match(line):
            in_fence = not in_fence
        elif not in_fence and line.startswith("#"):
            out.add(re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-"))
    return out


@pytest.mark.parametrize("path", [pytest.param(p, id=p.relative_to(ROOT).as_posix()) for p in documents()])
def test_relative_links_and_anchors_resolve(path: Path) -> None:
    text = re.sub(r"(?ms)^ {0,3}(`{3,}|~{3,}).*?^ {0,3}\1", "", path.read_text(encoding="utf-8"))
    broken = []
    for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]+))?\)", text):
        if re.match(r"^[a-z]+:", target):
            continue  # http(s), mailto
        file = (path.parent / target).resolve() if target else path
        if not file.exists():
            broken.append(target)
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            broken.append(f"{target}#{anchor}")
    assert not broken, f"{path.relative_to(ROOT)}: broken links {broken}"


# ------------------------------------------------------------------ references are complete


HOOKS = sorted(name for name, _ in inspect.getmembers(hookspecs, inspect.isfunction)
               if name.startswith("loadstone_") and hasattr(getattr(hookspecs, name), "loadstone_spec"))


def test_hookspecs_are_found() -> None:
    assert "loadstone_register_resolvers" in HOOKS and "loadstone_after_load" in HOOKS


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_has_a_section_with_its_signature(hook: str) -> None:
    text = (DOCS / "hooks.md").read_text(encoding="utf-8")
    body = section(text, rf"^#+ .*`?{hook}`?")
    assert body is not None, f"docs/hooks.md has no section whose heading names {hook}"
    signature = f"{hook}{signature_text(getattr(hookspecs, hook))}"
    assert signature in body, f"docs/hooks.md, section {hook}: the exact signature {signature} is missing"
    assert "```python" in body, f"docs/hooks.md, section {hook}: add a runnable example"


def _test_sources() -> dict[Path, str]:
    files = [*ROOT.glob("tests/**/*.py"), *ROOT.glob("plugins/*/tests/**/*.py"),
             *ROOT.glob("docs/examples/*/tests/**/*.py")]
    own = {ROOT / "tests" / name for name in ("test_docs_reference.py", "test_docs_examples.py", "docs_support.py")}
    return {f: f.read_text(encoding="utf-8") for f in files if f.resolve() not in own}


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_is_named_by_a_test(hook: str) -> None:
    found = [f for f, text in _test_sources().items() if re.search(rf"\b{hook}\b", text)]
    assert found, (f"no test names {hook} (searched tests/, plugins/*/tests/, docs/examples/*/tests/; "
                   f"the docs tests themselves do not count): add one that implements or calls it")


COMPONENTS = [loadstone.QuantizationBackend, loadstone.PlacementStrategy, loadstone.Resolver, loadstone.Engine,
              loadstone.ReadAhead]
VALUE_OBJECTS = [loadstone.QuantizationContext, loadstone.PlacementContext, loadstone.EngineContext,
                 loadstone.ResolveContext, loadstone.ResolvedSource, loadstone.RemoteHeader]


def _public_members(cls) -> list[str]:
    return sorted(n for n, v in vars(cls).items()
                  if not n.startswith("_") and (callable(v) or isinstance(v, property)))


@pytest.mark.parametrize("cls", COMPONENTS, ids=lambda c: c.__name__)
def test_every_component_method_is_documented(cls) -> None:
    body = section((DOCS / "hooks.md").read_text(encoding="utf-8"), rf"^#+ .*`?{cls.__name__}`?")
    assert body is not None, f"docs/hooks.md has no section whose heading names {cls.__name__}"
    for name in _public_members(cls):
        signature = f"{name}{signature_text(getattr(cls, name))}"
        assert signature in body, f"docs/hooks.md, section {cls.__name__}: {signature} is missing"
    for name in ("name", "description", "methods", "checkpoint_formats", "requirements", "priority", "preference"):
        if name in getattr(cls, "__annotations__", {}):
            assert f"`{name}`" in body, f"docs/hooks.md, section {cls.__name__}: class attribute {name} is missing"


@pytest.mark.parametrize("cls", VALUE_OBJECTS, ids=lambda c: c.__name__)
def test_every_value_object_field_is_documented(cls) -> None:
    body = section((DOCS / "hooks.md").read_text(encoding="utf-8"), rf"^#+ .*`?{cls.__name__}`?")
    assert body is not None, f"docs/hooks.md has no section whose heading names {cls.__name__}"
    names = [f.name for f in dataclasses.fields(cls)] + _public_members(cls)
    missing = [n for n in names if not re.search(rf"`{n}\b", body)]
    assert not missing, f"docs/hooks.md, section {cls.__name__}: undocumented {missing}"


@pytest.mark.parametrize("name", sorted(loadstone.__all__))
def test_every_public_name_is_documented(name: str) -> None:
    text = (DOCS / "api.md").read_text(encoding="utf-8")
    body = section(text, rf"^#+ .*`{re.escape(name)}\b")
    assert body is not None, f"docs/api.md has no section whose heading names `{name}`"
    obj = getattr(loadstone, name)
    if inspect.isfunction(obj):
        signature = f"{name}{signature_text(obj)}"
        assert signature in body, f"docs/api.md, section {name}: the exact signature {signature} is missing"


def _cli_commands() -> dict[str, list[str]]:
    from loadstone.cli import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    commands = {"loadstone": [s for a in parser._actions for s in a.option_strings]}
    for name, sub in subparsers.choices.items():
        commands[f"loadstone {name}"] = [s for a in sub._actions for s in a.option_strings]
    return commands


@pytest.mark.parametrize("command", sorted(_cli_commands()))
def test_every_cli_command_and_option_is_documented(command: str) -> None:
    text = (DOCS / "cli.md").read_text(encoding="utf-8")
    body = sections(text, rf"^#+ .*`{command}`")
    assert body, f"docs/cli.md has no section whose heading names `{command}`"
    missing = [o for o in _cli_commands()[command] if not re.search(rf"(?<![\w-]){re.escape(o)}(?![\w-])", body)]
    assert not missing, f"docs/cli.md, `{command}`: options not documented in its section(s): {missing}"


# ------------------------------------------------------------------ the example plugin: background results
