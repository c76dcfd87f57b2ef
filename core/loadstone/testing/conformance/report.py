"""What a conformance run returns (:class:`ConformanceReport` of :class:`CheckResult`), and the
machinery every kit shares (:class:`Kit`): the component under test, the plugin manager, tiny
checkpoints built once per work folder, and running checks so that one failing check never
hides the others."""

from __future__ import annotations

import atexit
from abc import ABC, abstractmethod
import json
import shutil
import sys
import tempfile
import threading
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable

from .listing import check_listing, same_distribution

__all__ = ["CheckResult", "ConformanceFailure", "ConformanceReport", "Kit"]


class ConformanceFailure(AssertionError):
    """Raised by :meth:`ConformanceReport.assert_ok` when a check failed; the message lists every
    failed check with what it found."""


@dataclass
class CheckResult:
    """One check of one component: ``status`` is ``"passed"``, ``"failed"`` or ``"skipped"``.

    :ivar problems: what the check found wrong (empty when it passed).
    :ivar measured: numbers and facts the check recorded (estimates, peaks, engines ...), also
        for passing checks: they show how close a component is to a limit.
    :ivar reason: why a check was skipped.
    """

    name: str
    description: str
    status: str = "passed"
    problems: list[str] = field(default_factory=list)
    measured: dict[str, Any] = field(default_factory=dict)
    reason: str = ""

    def expect(self, condition: Any, problem: str) -> bool:
        """Record ``problem`` unless ``condition`` holds; returns ``bool(condition)``."""
        if not condition:
            self.problems.append(problem)
            self.status = "failed"
        return bool(condition)

    def record(self, key: str, value: Any) -> None:
        self.measured[key] = value

    def skip(self, reason: str) -> None:
        if self.status != "failed":
            self.status = "skipped"
            self.reason = reason

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "status": self.status,
                "problems": list(self.problems), "measured": self.measured, "reason": self.reason}

    def render(self) -> str:
        head = f"{self.status.upper():7} {self.name}: {self.description}"
        lines = [head] + [f"        - {p}" for p in self.problems]
        if self.reason:
            lines.append(f"        ({self.reason})")
        return "\n".join(lines)


@dataclass
class ConformanceReport:
    """The checks run against one component (``kind`` and ``name``) and what each found."""

    kind: str
    name: str
    plugin: str
    distribution: str
    results: list[CheckResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No check failed (skipped checks do not fail a report)."""
        return all(r.status != "failed" for r in self.results)

    @property
    def failures(self) -> list[CheckResult]:
        return [r for r in self.results if r.status == "failed"]

    def __getitem__(self, name: str) -> CheckResult:
        for result in self.results:
            if result.name == name:
                return result
        raise KeyError(f"no check {name!r} in this report (ran: {', '.join(r.name for r in self.results)})")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "plugin": self.plugin, "distribution": self.distribution,
                "ok": self.ok, "results": [r.to_dict() for r in self.results]}

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), indent=kwargs.pop("indent", 2), default=str, **kwargs)

    def render(self) -> str:
        title = f"conformance of {self.kind} {self.name!r} ({self.distribution}, plugin {self.plugin})"
        return "\n".join([title, *(r.render() for r in self.results)])

    def assert_ok(self) -> "ConformanceReport":
        """Raise :class:`ConformanceFailure` listing every failed check. Under pytest, a report
        whose every check was skipped skips the calling test (with the reasons) instead of
        passing it."""
        if not self.ok:
            raise ConformanceFailure(self.render())
        if self.results and all(r.status == "skipped" for r in self.results) and "pytest" in sys.modules:
            import pytest

            pytest.skip("; ".join(f"{r.name}: {r.reason}" for r in self.results))
        return self


# ---------------------------------------------------------------------------------- kits

_default_workdir: Path | None = None
_workdir_lock = threading.Lock()
_build_lock = threading.Lock()


def default_workdir() -> Path:
    """One temporary folder per process for the kits' checkpoints, removed at exit."""
    global _default_workdir
    with _workdir_lock:
        if _default_workdir is None:
            _default_workdir = Path(tempfile.mkdtemp(prefix="loadstone-conformance-"))
            atexit.register(shutil.rmtree, _default_workdir, True)
        return _default_workdir


class Kit(ABC):
    """Shared machinery of the four kits. Subclasses set ``kind`` and ``checks`` (check name ->
    what it proves) and implement ``check_<name>(result)`` for each, plus ``_find()``."""

    kind: ClassVar[str]
    checks: ClassVar[dict[str, str]]

    def __init__(self, *, plugins: Any = None, distribution: str | None = None, workdir: str | Path | None = None,
                 heavy_modules: Iterable[str] = ()):
        from ...plugins import get_plugin_manager

        self.plugins = plugins if plugins is not None else get_plugin_manager()
        self.expected_distribution = distribution
        self.workdir = Path(workdir) if workdir is not None else default_workdir()
        self.heavy_modules = tuple(heavy_modules)
        self.registration = self._find()

    @abstractmethod
    def _find(self) -> Any:
        """The registration of the component under test (each kit knows its kind)."""

    # -- tiny checkpoints, built once per work folder ---------------------------------
    def checkpoint(self, arch: str, **kwargs: Any) -> Path:
        """A tiny random checkpoint of ``arch`` (see :func:`loadstone.testing.make_checkpoint`)."""
        from ..checkpoints import make_checkpoint

        folder = self.workdir / ("ckpt-" + arch + "".join(f"-{k}={v}" for k, v in sorted(kwargs.items())))
        with _build_lock:
            if not (folder / "config.json").is_file():
                make_checkpoint(arch, folder, **kwargs)
        return folder

    def adapter(self, arch: str, **checkpoint_kwargs: Any) -> Path:
        """A LoRA adapter (peft's default targets for ``arch``) of :meth:`checkpoint`."""
        from ..checkpoints import make_lora_adapter

        base = self.checkpoint(arch, **checkpoint_kwargs)
        folder = base.with_name("lora-" + base.name)
        with _build_lock:
            if not (folder / "adapter_config.json").is_file():
                make_lora_adapter(base, folder, arch=arch)
        return folder

    # -- running -------------------------------------------------------------------------
    def run(self, only: Iterable[str] | None = None, skip: Iterable[str] = ()) -> ConformanceReport:
        """Run the checks (all, or ``only`` those, minus ``skip``) and return the report."""
        names = list(only) if only is not None else list(self.checks)
        unknown = [n for n in [*names, *skip] if n not in self.checks]
        if unknown:
            raise ValueError(f"unknown {self.kind} check(s) {unknown}; the checks are: {', '.join(self.checks)}")
        reg = self.registration
        report = ConformanceReport(self.kind, reg.name, reg.plugin, f"{reg.distribution} {reg.version}".strip())
        for name in names:
            if name in set(skip):
                continue
            result = CheckResult(name, self.checks[name])
            self._run_one(getattr(self, f"check_{name}"), result)
            report.results.append(result)
        return report

    @staticmethod
    def _run_one(check: Callable[[CheckResult], None], result: CheckResult) -> None:
        import warnings

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                check(result)
        except Exception as exc:  # a crash is a failure of this check, never of the others
            frames = traceback.extract_tb(exc.__traceback__)
            where = f" ({Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
            result.expect(False, f"raised {type(exc).__name__}: {exc}{where}")

    # -- checks every kit shares ------------------------------------------------------------
    def check_listing(self, result: CheckResult) -> None:
        check_listing(self, result)

    def owner_problems(self, decision: Any, topic: str) -> list[str]:
        """What is wrong with a report decision's attribution to the component under test."""
        reg = self.registration
        if decision is None:
            return [f"the report has no {topic!r} decision"]
        problems = []
        for attr in ("plugin", "distribution", "version"):
            if getattr(decision, attr) != getattr(reg, attr):
                problems.append(f"the report's {topic!r} decision names {attr} {getattr(decision, attr)!r}, "
                                f"expected {getattr(reg, attr)!r}")
        if self.expected_distribution is not None and not same_distribution(reg.distribution,
                                                                            self.expected_distribution):
            problems.append(f"{self.kind} {reg.name!r} is registered by {reg.distribution!r}, expected "
                            f"{self.expected_distribution!r}")
        return problems

