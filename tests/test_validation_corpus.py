"""Every malformed input of the corpus is refused by ``plan`` and by ``load`` with its typed error,
before any weight is read (the failing stage is resolve, inspect or plan, never load_weights)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import loadstone
from loadstone import LoadstoneError, hookimpl

sys.path.insert(0, str(Path(__file__).parent))  # tests/ is not a package (--import-mode=importlib)
import corpus  # noqa: E402
import corpus_values  # noqa: E402

CASES = corpus.CASES + corpus_values.CASES

STAGES_BEFORE_WEIGHTS = {"before_load", "resolve", "inspect", "plan"}


class StageRecorder:
    """A real plugin: records the stage each failed load reports through ``loadstone_load_failed``."""

    def __init__(self) -> None:
        self.stages: list[str] = []

    @hookimpl
    def loadstone_load_failed(self, stage):
        self.stages.append(stage)


@pytest.fixture(scope="session")
def corpus_sources(tiny_checkpoint, tiny_adapter) -> dict[str, Path]:
    return {"single": tiny_checkpoint("llama"), "sharded": tiny_checkpoint("llama", max_shard_size="200KB"),
            "mixtral": tiny_checkpoint("mixtral"), "adapter": tiny_adapter("llama")}


def test_sources_are_valid(corpus_sources):
    """The corpus means something only if its undamaged sources load."""
    for name in ("single", "sharded", "mixtral"):
        assert loadstone.plan(str(corpus_sources[name]), placement="cpu").fits, name
    assert loadstone.plan(str(corpus_sources["adapter"]), placement="cpu").sources.adapters


def test_case_names_are_unique():
    names = [case.name for case in CASES]
    assert len(names) == len(set(names))


def _assert_refused(error: LoadstoneError, case: corpus.Case, words: tuple[str, ...]) -> None:
    assert type(error) is case.error, f"{case.name}: {type(error).__name__}: {error}"
    text = str(error)
    missing = [w for w in words if w not in text]
    assert not missing, f"{case.name}: {missing} not in:\n{text}"
    assert error.fix, f"{case.name}: the error says no fix:\n{text}"
    assert error.field, f"{case.name}: the error names no field:\n{text}"
    assert error.file or error.found, f"{case.name}: the error names neither a file nor what it found:\n{text}"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_malformed_input_is_refused_before_weights_are_read(case, corpus_sources, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    built = corpus.materialize(case, corpus_sources, tmp_path / "case")
    recorder = StageRecorder()
    plugins = loadstone.PluginManager(extra_plugins=[("stage-recorder", recorder)])

    with pytest.raises(LoadstoneError) as planned:
        loadstone.plan(built.reference, plugins=plugins, placement="cpu", **built.kwargs)
    _assert_refused(planned.value, case, built.words)

    with pytest.raises(LoadstoneError) as loaded:
        loadstone.load(built.reference, plugins=plugins, placement="cpu", progress=False, **built.kwargs)
    _assert_refused(loaded.value, case, built.words)
    assert str(loaded.value) == str(planned.value)

    assert len(recorder.stages) == 2 and set(recorder.stages) <= STAGES_BEFORE_WEIGHTS, recorder.stages
    assert not (tmp_path / "case" / "MARKER").exists(), "a pickle payload ran"
