"""The splitting arithmetic of ``even`` / ``layers:N``, free of models: contiguous, within budgets,
as even as possible (checked against brute force), ends where they cost least."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from loadstone_devicemap.split import Block, Device, spill, split_layers


def layers(*sizes: int, transient: int = 0) -> list[Block]:
    return [Block((f"model.layers.{i}",), n, transient) for i, n in enumerate(sizes)]


def gpus(*budgets: int | None) -> list[Device]:
    return [Device(i, b) for i, b in enumerate(budgets)]


def counts(split) -> list[int]:
    return [split.layers.count(d) for d in sorted(set(split.layers), key=str)]


def test_equal_layers_split_evenly_and_in_order():
    for n in (2, 3, 4, 8):
        split = split_layers(layers(*[10] * 32), gpus(*[None] * n))
        assert split.layers == sorted(split.layers)  # contiguous runs, GPU by GPU
        assert max(counts(split)) - min(counts(split)) <= 1
        assert split.largest == 10 * -(-32 // n)


def test_embeddings_first_and_head_last_when_that_is_as_good():
    split = split_layers(layers(*[10] * 8), gpus(None, None), input_block=Block(("embed",), 30),
                         output_block=Block(("norm", "head"), 30))
    assert (split.input, split.output) == (0, 1)
    assert split.loads == {0: 70, 1: 70}


def test_a_large_head_goes_where_it_costs_least():
    # head bigger than four layers: on its own GPU with fewer layers
    split = split_layers(layers(*[10] * 6), gpus(None, None, None), input_block=Block(("embed",), 5),
                         output_block=Block(("head",), 40))
    assert split.output == 2 and split.layers.count(2) == 0
    assert split.largest == 40


def test_tied_ends_share_a_gpu():
    split = split_layers(layers(*[10] * 8), gpus(None, None), input_block=Block(("wte",), 25),
                         output_block=Block(("ln_f", "lm_head"), 1), tied_ends=True)
    assert split.input == split.output
    assert split.largest == max(split.loads.values()) == 56  # 25 + 1 + 3 layers against 5 layers


def test_budgets_are_respected_and_unequal_gpus_take_unequal_shares():
    split = split_layers(layers(*[10] * 10), gpus(35, 100))
    assert split.layers.count(0) == 3 and split.loads[0] <= 35
    # the transient (one full-precision tensor while converting) counts against the budget
    split = split_layers(layers(*[10] * 10, transient=6), gpus(35, 100))
    assert split.layers.count(0) == 2 and split.peaks[0] == 26
    assert split_layers(layers(*[10] * 10), gpus(30, 30)) is None


def test_what_the_gpus_cannot_hold_spills_to_cpu_then_disk():
    cpu, disk = Device("cpu", 25), Device("disk", None)
    split = spill(layers(*[10] * 10), gpus(30, 30), [cpu, disk])
    assert split.layers == [0] * 3 + [1] * 3 + ["cpu"] * 2 + ["disk"] * 2
    assert split.loads["cpu"] == 20 and split.loads["disk"] == 20
    assert spill(layers(*[10] * 10), gpus(30, 30), [cpu]) is None  # nowhere for the last two


def brute_force(sizes: list[int], budgets: list[int | None]) -> int | None:
    """The smallest largest share over every contiguous split (some GPUs may take none)."""
    best = None
    n, g = len(sizes), len(budgets)
    for cuts in itertools.combinations_with_replacement(range(n + 1), g - 1):
        bounds = [0, *cuts, n]
        loads = [sum(sizes[bounds[i]:bounds[i + 1]]) for i in range(g)]
        if all(b is None or load <= b for load, b in zip(loads, budgets)):
            best = max(loads) if best is None else min(best, max(loads))
    return best


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(1, 50), min_size=1, max_size=9),
       st.lists(st.one_of(st.none(), st.integers(20, 200)), min_size=1, max_size=4))
def test_the_split_is_the_most_even_one(sizes, budgets):
    split = split_layers(layers(*sizes), gpus(*budgets))
    best = brute_force(sizes, budgets)
    if best is None:
        assert split is None
        return
    assert split is not None and split.largest == best
    assert split.layers == sorted(split.layers) and len(split.layers) == len(sizes)
    for device, budget in enumerate(budgets):
        assert budget is None or split.loads.get(device, 0) <= budget
