"""The conformance kit: the contract's checks for a quantization backend, an engine, a placement
strategy or a resolver, run on tiny real checkpoints (docs/conformance.md).

Plain functions return a :class:`ConformanceReport`; ``assert_ok()`` turns it into a test::

    from loadstone.testing import conformance

    def test_my_backend_conforms():
        conformance.check_backend("my-method").assert_ok()

One pytest test per check, so a failure names the check::

    @pytest.mark.parametrize("check", conformance.BACKEND_CHECKS)
    def test_my_backend(loadstone_conformance, check):
        loadstone_conformance.backend("my-method", only=[check]).assert_ok()

(``loadstone_conformance`` is a fixture of loadstone's pytest plugin; its kits share one work
folder per test session, so the tiny checkpoints are built once.)

Importing this module is cheap; torch and transformers are imported when a check runs.
"""

from __future__ import annotations

from .backend import BACKEND_CHECKS, BackendKit, check_backend, compare_tensors
from .conversions import Conversion, ConversionMeter
from .engine import ENGINE_CHECKS, EngineKit, check_engine
from .listing import HEAVY_MODULES, list_plugins_in_fresh_process
from .measure import AllocationPeak, reachable_tensors, stored_bytes
from .placement import PLACEMENT_CHECKS, PlacementKit, check_placement
from .report import CheckResult, ConformanceFailure, ConformanceReport, Kit
from .resolver import FOREIGN_REFERENCES, RESOLVER_CHECKS, ResolverKit, check_resolver
from .session import ConformanceSession
from .training import TrainingStep, train_one_step

__all__ = [
    "check_backend", "check_engine", "check_placement", "check_resolver",
    "BACKEND_CHECKS", "ENGINE_CHECKS", "PLACEMENT_CHECKS", "RESOLVER_CHECKS",
    "BackendKit", "EngineKit", "PlacementKit", "ResolverKit", "Kit",
    "ConformanceReport", "CheckResult", "ConformanceFailure", "ConformanceSession",
    "AllocationPeak", "ConversionMeter", "Conversion", "reachable_tensors", "stored_bytes", "compare_tensors",
    "train_one_step", "TrainingStep", "HEAVY_MODULES", "FOREIGN_REFERENCES", "list_plugins_in_fresh_process",
]
