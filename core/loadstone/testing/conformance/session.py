"""The kits bound to one work folder: what the ``loadstone_conformance`` pytest fixture returns."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .backend import check_backend
from .engine import check_engine
from .placement import check_placement
from .report import ConformanceReport
from .resolver import check_resolver


class ConformanceSession:
    """Runs kits whose tiny checkpoints live in one folder, so that every check of a test session
    builds each checkpoint once. Each method takes the matching ``check_*`` function's arguments
    (``only=[...]``, ``skip=[...]``, ``plugins=``, ...) and returns its report."""

    def __init__(self, workdir: str | Path):
        self.workdir = Path(workdir)

    def backend(self, method: str, **kwargs: Any) -> ConformanceReport:
        return check_backend(method, workdir=self.workdir, **kwargs)

    def engine(self, engine: str, **kwargs: Any) -> ConformanceReport:
        return check_engine(engine, workdir=self.workdir, **kwargs)

    def placement(self, spec: Any, **kwargs: Any) -> ConformanceReport:
        return check_placement(spec, workdir=self.workdir, **kwargs)

    def resolver(self, name: str, **kwargs: Any) -> ConformanceReport:
        return check_resolver(name, workdir=self.workdir, **kwargs)
