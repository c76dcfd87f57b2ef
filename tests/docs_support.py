"""Reading the documentation for its tests: fenced blocks, sections, signatures.

Shared by tests/test_docs_examples.py (examples run) and tests/test_docs_reference.py (references
are complete, links resolve); see docs/CONTRIBUTING.md, "Documentation examples are tests".
"""

from __future__ import annotations

import inspect
import re
import sys
from pathlib import Path
from typing import Iterator, NamedTuple

import pytest


ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
EXAMPLE = DOCS / "examples" / "loadstone-example-plugin"
EXAMPLE_DIST = "loadstone-example-plugin"
BIN = Path(sys.executable).parent
# Documents whose examples assume the example plugin is installed (the tutorial's readers did).
NEEDS_EXAMPLE_PLUGIN = {"docs/plugin-tutorial.md", "docs/examples/loadstone-example-plugin/README.md"}
# Environment every example runs in: no network, no GPU, no user cache; and for docs/gptq.md, none
# of gptqmodel's one-time compilations (its C++ packing extension, ~33 s on the first quantize, and
# TorchLinear's torch.compile on each layer's first forward), which would dominate the examples.
EXAMPLE_ENV = {"HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "TRANSFORMERS_VERBOSITY": "error",
               "GPTQMODEL_DISABLE_PACK_EXT": "1", "TORCHDYNAMO_DISABLE": "1"}


# ------------------------------------------------------------------ reading the documents


class Block(NamedTuple):
    doc: str  # path relative to the repository root
    line: int  # line number of the first line of code (1-based)
    lang: str
    flags: tuple[str, ...]
    text: str

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}"

    def flag(self, name: str) -> str | None:
        for flag in self.flags:
            key, _, value = flag.partition("=")
            if key == name:
                return value
        return None


def documents() -> list[Path]:
    return sorted(DOCS.glob("*.md")) + [ROOT / "README.md", EXAMPLE / "README.md"]


_FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*)$")


def blocks(path: Path) -> Iterator[Block]:
    lines = path.read_text(encoding="utf-8").splitlines()
    rel = path.relative_to(ROOT).as_posix()
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        fence, indent = match.group("fence"), len(match.group("indent"))
        info = match.group("info").split()
        body, j = [], i + 1
        while j < len(lines) and not (lines[j].strip().startswith(fence) and lines[j].strip().strip(fence[0]) == ""):
            body.append(lines[j][indent:] if lines[j][:indent].strip() == "" else lines[j])
            j += 1
        yield Block(rel, i + 2, info[0] if info else "", tuple(info[1:]), "\n".join(body) + "\n")
        i = j + 1


def all_blocks() -> list[Block]:
    return [b for path in documents() if path.is_file() for b in blocks(path)]


def runnable(lang: str) -> list:
    found = [b for b in all_blocks() if b.lang == lang and "notest" not in b.flags and b.flag("file") is None]
    return [pytest.param(b, id=b.id) for b in found]


def section(text: str, heading_pattern: str) -> str | None:
    """The text under the first heading matching ``heading_pattern``, up to the next heading of
    the same or a higher level (fenced code is part of the section)."""
    lines = text.splitlines()
    in_fence = False
    start = level = None
    for n, line in enumerate(lines):
        if _FENCE.match(line):
            in_fence = not in_fence
        if in_fence or not line.startswith("#"):
            continue
        depth = len(line) - len(line.lstrip("#"))
        if start is None and re.search(heading_pattern, line):
            start, level = n, depth
        elif start is not None and depth <= level:
            return "\n".join(lines[start:n])
    return "\n".join(lines[start:]) if start is not None else None


def sections(text: str, heading_pattern: str) -> str:
    """Every section whose heading matches, concatenated."""
    out, rest = [], text
    while (found := section(rest, heading_pattern)) is not None:
        out.append(found)
        rest = rest[rest.index(found) + len(found):]
    return "\n".join(out)


def signature_text(obj) -> str:
    """``inspect.signature`` as the docs write it: string annotations without their quotes."""
    return str(inspect.signature(obj)).replace("'", "").replace('"', "")


# ------------------------------------------------------------------ the example plugin, installed
