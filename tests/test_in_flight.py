"""The native engine's ``in_flight`` allowance: full-precision tensors a GPU may hold beyond the
largest group while they wait to be quantized, settled at plan time and counted in the plan's
peak. Planned here for a CUDA device on any machine (plans read no weights); the loads that use
it run in plugins/loadstone-bnb/tests/test_gpu.py."""

from __future__ import annotations

import pytest

import loadstone
from loadstone.engines.native_options import in_flight_option
from loadstone.engines.streaming import IN_FLIGHT, in_flight_allowance

MiB = 1 << 20


@pytest.mark.parametrize("value, stored", [("auto", "auto"), (0, 0), ("0", 0), ("64MiB", 64 * MiB),
                                           (3 * MiB, 3 * MiB), ("1TiB", 1 << 40)])
def test_the_option_takes_auto_or_a_size(value, stored):
    assert in_flight_option(value) == stored


@pytest.mark.parametrize("value", [-1, "lots", True, None, float("nan"), "2TiB", [256], {"a": 1}])
def test_other_values_are_refused_naming_the_option(value):
    with pytest.raises(loadstone.OptionError) as info:
        in_flight_option(value)
    assert info.value.field == "engine option in_flight"


def test_auto_takes_the_default_where_there_is_room_and_no_more_than_fits():
    assert in_flight_allowance({"cuda:0": None}, "auto") == {"cuda:0": IN_FLIGHT}
    assert in_flight_allowance({"cuda:0": 10 * IN_FLIGHT, "cuda:1": IN_FLIGHT // 4}, "auto") == \
        {"cuda:0": IN_FLIGHT, "cuda:1": IN_FLIGHT // 4}
    assert in_flight_allowance({"cuda:0": -5}, "auto") == {"cuda:0": 0}  # over budget already: the fit says so
    assert in_flight_allowance({"cuda:0": 1}, 64 * MiB) == {"cuda:0": 64 * MiB}  # asked: as asked


def _gpu_plan(folder, budget="80GiB", **options):
    return loadstone.plan(folder, quantization="nf4", placement="auto", max_memory={"cuda:0": budget},
                          engine="loadstone", engine_options={"reader": "pread", **options})


def test_a_quantized_gpu_plan_counts_the_allowance_in_its_peak(tiny_checkpoint):
    folder = str(tiny_checkpoint("llama"))
    plan = _gpu_plan(folder)
    none = _gpu_plan(folder, in_flight=0)
    assert plan.engine_options["in_flight"] == IN_FLIGHT and none.engine_options["in_flight"] == 0
    assert plan.report.engine["extra_bytes"] == {"cuda:0": IN_FLIGHT} and "extra_bytes" not in none.report.engine
    assert plan.peak_bytes_per_device["cuda:0"] == none.peak_bytes_per_device["cuda:0"] + IN_FLIGHT
    assert plan.report.placement["peak_bytes_per_device"] == plan.peak_bytes_per_device
    assert "in_flight=256.00 MiB" in plan.report.render()


def test_auto_shrinks_to_the_room_the_budget_leaves_and_an_asked_size_that_does_not_fit_is_said(tiny_checkpoint):
    folder = str(tiny_checkpoint("llama"))
    peak = _gpu_plan(folder, in_flight=0).peak_bytes_per_device["cuda:0"]
    tight = _gpu_plan(folder, budget=peak + 10 * MiB)
    assert tight.fits and tight.engine_options["in_flight"] == 10 * MiB
    assert tight.peak_bytes_per_device["cuda:0"] == peak + 10 * MiB
    asked = _gpu_plan(folder, budget=peak + 10 * MiB, in_flight="64MiB")
    assert not asked.fits and asked.peak_bytes_per_device["cuda:0"] == peak + 64 * MiB


def test_nothing_is_allowed_where_nothing_is_transient_or_the_load_stays_on_the_cpu(tiny_checkpoint):
    folder = str(tiny_checkpoint("llama"))
    plain = loadstone.plan(folder, placement="auto", max_memory={"cuda:0": "80GiB"}, engine="loadstone",
                           engine_options={"reader": "pread"})  # bf16 as stored: read into final storage
    assert "in_flight" not in plain.engine_options and "extra_bytes" not in plain.report.engine
    cpu = loadstone.plan(folder, quantization="nf4", placement="cpu", engine="loadstone")
    assert "in_flight" not in cpu.engine_options and "extra_bytes" not in cpu.report.engine
