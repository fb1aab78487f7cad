"""ESP batching DP: equal to brute force over every split and DoP assignment on small cases; sensible
decisions on hand-made queues; memory and compile constraints respected."""

import itertools
import random

import numpy as np
import pytest

from loong_jax.scheduler.esp.batching import plan_batches, split_points
from loong_jax.scheduler.groups import aligned_groups, capacity_by_threshold, free_blocks

from tests.scheduler.helpers import synthetic_cost

SIZES = [1, 2, 4, 8]
UNLIMITED = {d: 10 ** 9 for d in SIZES}


def packable(dops, free):
    """Exhaustive search: disjoint family groups of these sizes inside `free` (backtracking)."""
    groups = [g for g in aligned_groups(8) if set(g) <= set(free)]

    def place(k, used):
        if k == len(dops):
            return True
        return any(place(k + 1, used | set(g)) for g in groups if len(g) == dops[k] and not used & set(g))

    return place(0, set())


def brute_force(lengths, free, cost, pages=None, pages_capacity=UNLIMITED, defer=None):
    """Cheapest assignment over every split of the length-sorted requests into consecutive parts, each part
    a batch with any DoP (the batches must pack into the free instances) or, with `defer`, left waiting at
    the sum of its requests' defer costs."""
    n = len(lengths)
    pages = pages or [1] * n
    order = sorted(range(n), key=lambda i: -lengths[i])
    choices = SIZES + ([0] if defer is not None else [])
    best = np.inf
    for k in range(1, n + 1):
        for inner in itertools.combinations(range(1, n), k - 1):
            cuts = (0,) + inner + (n,)
            parts = [order[cuts[j]:cuts[j + 1]] for j in range(k)]
            for dops in itertools.product(choices, repeat=k):
                if any(d and sum(pages[i] for i in p) > pages_capacity[d] for p, d in zip(parts, dops)):
                    continue
                if not packable([d for d in dops if d], free):
                    continue
                total = sum(cost.prefill_time(d, [lengths[i] for i in p]) * sum(1 / lengths[i] for i in p)
                            if d else sum(defer[i] for i in p) for p, d in zip(parts, dops))
                best = min(best, total)
    return best


def run_dp(lengths, free, cost, pages=None, pages_capacity=UNLIMITED, **kw):
    blocks = free_blocks(free, 8)
    sizes = [s for s in SIZES if s <= len(blocks[0])]
    return plan_batches(lengths, pages or [1] * len(lengths), cost, sizes, capacity_by_threshold(blocks, sizes),
                        pages_capacity, **kw)


def test_dp_equals_brute_force_on_random_small_cases():
    cost = synthetic_cost()
    rng = random.Random(1)
    for _ in range(25):
        n = rng.randint(1, 5)
        lengths = [rng.choice([rng.randint(8, 400), rng.randint(2_000, 120_000)]) for _ in range(n)]
        free = sorted(rng.sample(range(8), rng.randint(1, 8)))
        result = run_dp(lengths, free, cost)
        expected = brute_force(lengths, free, cost)
        assert result.cost == pytest.approx(expected, rel=1e-9), (lengths, free)
        assert sorted(i for b in result.batches for i in b.indices) == list(range(n))
        assert packable([b.dop for b in result.batches], free)


def test_dp_equals_brute_force_under_memory_limits():
    cost = synthetic_cost()
    rng = random.Random(2)
    for _ in range(10):
        n = rng.randint(2, 5)
        lengths = [rng.randint(100, 50_000) for _ in range(n)]
        pages = [length // 16 + 1 for length in lengths]
        capacity = {1: 1_500, 2: 3_000, 4: 6_000, 8: 12_000}
        free = list(range(8))
        result = run_dp(lengths, free, cost, pages, capacity)
        expected = brute_force(lengths, free, cost, pages, capacity)
        if np.isinf(expected):
            assert result is None
        else:
            assert result.cost == pytest.approx(expected, rel=1e-9)
            for batch in result.batches:
                assert sum(pages[i] for i in batch.indices) <= capacity[batch.dop]


def test_dp_with_deferral_equals_brute_force():
    cost = synthetic_cost()
    rng = random.Random(3)
    for _ in range(15):
        n = rng.randint(1, 4)
        lengths = [rng.choice([rng.randint(8, 400), rng.randint(2_000, 120_000)]) for _ in range(n)]
        free = sorted(rng.sample(range(8), rng.randint(1, 4)))
        defer = [rng.choice([np.inf, rng.uniform(0.0, 2.0) / length]) for length in lengths]
        result = run_dp(lengths, free, cost, defer_costs=defer)
        expected = brute_force(lengths, free, cost, defer=defer)
        assert result.cost == pytest.approx(expected, rel=1e-9), (lengths, free, defer)
        scheduled = sorted(i for b in result.batches for i in b.indices)
        assert sorted(scheduled + list(result.deferred)) == list(range(n))
        assert all(np.isfinite(defer[i]) for i in result.deferred)


def test_a_prompt_that_needs_every_free_instance_does_not_drag_short_ones_into_its_batch():
    # Two free instances of 1,000 pages; the 20K prompt needs both (memory). Without deferral the short
    # prompts must share its batch; with it, they run now and the long one waits (or the reverse).
    cost = synthetic_cost()
    lengths, pages = [20_000, 100, 150], [1_300, 8, 11]
    capacity = {1: 1_000, 2: 2_000}
    forced = run_dp(lengths, [6, 7], cost, pages, capacity)
    assert [sorted(b.indices) for b in forced.batches] == [[0, 1, 2]]
    defer = [2 * cost.prefill_time(2, [length]) / length for length in lengths]
    free_to_defer = run_dp(lengths, [6, 7], cost, pages, capacity, defer_costs=defer)
    batched = [sorted(b.indices) for b in free_to_defer.batches]
    assert [0, 1, 2] not in batched and free_to_defer.cost < forced.cost


def test_long_request_alone_gets_the_widest_group():
    result = run_dp([100_000], range(8), synthetic_cost())
    assert [(b.dop, b.indices) for b in result.batches] == [(8, (0,))]


def test_short_requests_never_wait_for_a_long_one():
    # Normalised latency: a 200-token prompt batched with a 100K prompt would wait the long prefill.
    lengths = [100_000] + [200] * 12
    result = run_dp(lengths, range(8), synthetic_cost())
    by_request = {i: b for b in result.batches for i in b.indices}
    assert by_request[0].indices == (0,)
    assert sum(b.dop for b in result.batches) == 8  # every free instance works
    assert all(b.seconds < 0.1 for b in result.batches if 0 not in b.indices)


def test_a_single_free_instance_means_one_batch_of_dop_one():
    result = run_dp([5_000, 300, 40], [5], synthetic_cost())
    assert [(b.dop, sorted(b.indices)) for b in result.batches] == [(1, [0, 1, 2])]


def test_compile_penalty_steers_away_from_unready_sizes():
    cost = synthetic_cost()
    free = range(8)
    eager = run_dp([60_000], free, cost)
    assert eager.batches[0].dop == 8
    ready_only_two = run_dp([60_000], free, cost, penalty=lambda d, tokens: 0.0 if d == 2 else 30.0)
    assert ready_only_two.batches[0].dop == 2
    worth_it = run_dp([60_000], free, cost, penalty=lambda d, tokens: 0.0 if d == 2 else 0.01)
    assert worth_it.batches[0].dop == 8  # compiling 10 ms is worth the faster prefill


def test_infeasible_when_a_request_fits_no_group():
    assert run_dp([10_000], range(8), synthetic_cost(), [700], {1: 500, 2: 600, 4: 650, 8: 690}) is None


def test_split_points_compress_long_queues():
    cuts = split_points(1_000, 24, singles=16)
    assert cuts[0] == 0 and cuts[-1] == 1_000 and len(cuts) <= 24 and list(cuts[:12]) == list(range(12))
    assert list(split_points(5, 24, 16)) == [0, 1, 2, 3, 4, 5]
