"""Rule keys (exact names, globs with integer ranges, re:) and device values."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

import loadstone
from loadstone_devicemap.rules import glob_to_regex, parse_device, parse_rule

LAYERS = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(32)]


def covered(key: str) -> list[int]:
    rule = parse_rule(key, "cpu", where="t")
    return [i for i, name in enumerate(LAYERS) if rule.covers(name)]


def test_integer_ranges_lists_and_globs():
    assert covered("model.layers.[0-15].*") == list(range(16))
    assert covered("model.layers.[0-15]") == list(range(16))  # a module name covers what it holds
    assert covered("model.layers.[16-31]") == list(range(16, 32))
    assert covered("model.layers.[0,2,4]") == [0, 2, 4]
    assert covered("model.layers.[0-2,30]") == [0, 1, 2, 30]
    assert covered("model.layers.[7]") == [7]
    assert covered("model.layers.1*") == [1, *range(10, 20)]  # * may be empty and crosses dots
    assert covered("model.layers.?") == list(range(10))
    assert covered("*.up_proj") == list(range(32))


def test_exact_names_cover_their_module_only_at_dots():
    rule = parse_rule("model.layers.1", "cpu", where="t")
    assert rule.kind == "exact"
    assert rule.covers("model.layers.1.mlp.up_proj.weight")
    assert not rule.covers("model.layers.10.mlp.up_proj.weight")
    assert parse_rule("", "cpu", where="t").covers("anything.at.all")


def test_regular_expressions_match_in_full():
    rule = parse_rule(r"re:model\.layers\.(1[6-9]|2\d|3[01])", 1, where="t")
    assert rule.kind == "regex" and rule.device == 1
    assert covered(r"re:model\.layers\.(1[6-9]|2\d|3[01])") == list(range(16, 32))
    assert covered(r"re:layers\.1") == []  # full match, not search


@pytest.mark.parametrize(("value", "expected"), [
    ("cuda:1", 1), (1, 1), ("1", 1), ("cuda", 0), ("CPU", "cpu"), ("disk", "disk"), ("mps", "mps"),
    ("xpu:0", "xpu:0"), (" cuda:2 ", 2)])
def test_devices_are_normalised(value, expected):
    assert parse_device(value, key="k", where="t", file=None) == expected


@pytest.mark.parametrize("value", [True, None, "gpu0", "cuda:x", -1, 1.5, ["cpu"], "cuda:-1"])
def test_anything_else_is_not_a_device(value):
    with pytest.raises(loadstone.PlacementError) as info:
        parse_device(value, key="model.norm", where="map.yaml line 3", file="map.yaml")
    error = info.value
    assert error.field == "map.yaml line 3: 'model.norm'" and "cuda:N" in error.expected and error.fix


@pytest.mark.parametrize(("key", "problem"), [
    ("model.layers.[a-b]", "do not hold integers"),
    ("model.layers.[9-3]", "runs backwards"),
    ("model.layers.[0-15", "does not close"),
    ("re:model.layers.(", "not a valid regular expression"),
    (7, "not a name"),
])
def test_malformed_keys_are_clear_errors(key, problem):
    with pytest.raises(loadstone.PlacementError) as info:
        parse_rule(key, "cpu", where="map.yaml line 2", file="map.yaml")
    assert problem in str(info.value) and info.value.file == "map.yaml"


@given(st.integers(0, 200), st.integers(0, 200), st.integers(0, 300))
def test_a_range_covers_exactly_its_integers(low, span, probe):
    high = low + span
    pattern = glob_to_regex(f"layers.[{low}-{high}]")
    assert (re.fullmatch(pattern, f"layers.{probe}") is not None) == (low <= probe <= high)
    assert re.fullmatch(pattern, f"layers.0{probe}") is None  # no leading zeros: layer names have none
