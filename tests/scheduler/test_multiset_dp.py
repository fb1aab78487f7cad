"""The batching DP's search (`esp.multiset_dp`) against a plain reference: relax every move one DoP after
another with strict improvement, keeping argmins (the search before it was vectorised over whole layers).
Small integer costs make many ties, so the tie-breaking (first DoP, first start cut) is checked too."""

import numpy as np
import pytest

from loong_jax.scheduler.esp.multiset_dp import CoverReuse, CoverStep, cheapest_cover, multiset_transitions


def reference_cover(batch_costs, skip, states, layers):
    m = batch_costs.shape[0]
    best = np.full((len(states), m), np.inf)
    best[0, 0] = 0.0
    parent_state = np.zeros((len(states), m), np.int64)
    parent_dop = np.full((len(states), m), -1, np.int64)
    parent_cut = np.zeros((len(states), m), np.int64)

    def relax(targets, sources, dop_index, matrix):
        totals = best[sources][:, :, None] + matrix[None, :, :]  # [moves, from cut, to cut]
        from_cut, values = totals.argmin(axis=1), totals.min(axis=1)
        rows, cols = np.nonzero(values < best[targets])
        best[targets[rows], cols] = values[rows, cols]
        parent_state[targets[rows], cols] = sources[rows]
        parent_dop[targets[rows], cols] = dop_index
        parent_cut[targets[rows], cols] = from_cut[rows, cols]

    if skip is not None:
        relax(np.array([0]), np.array([0]), -1, skip)
    for layer in layers:
        for k in np.unique(layer.dop_index):
            of_k = layer.dop_index == k
            relax(_targets_of(layer)[of_k], layer.sources[of_k], int(k), batch_costs[:, :, k])
        if skip is not None:
            relax(layer.targets, layer.targets, -1, skip)
    final_state = int(best[:, -1].argmin())
    if not np.isfinite(best[final_state, -1]):
        return None
    steps, state, cut = [], final_state, m - 1
    while cut > 0:
        d, a = int(parent_dop[state, cut]), int(parent_cut[state, cut])
        steps.append(CoverStep(None if d < 0 else d, a, cut))
        state, cut = int(parent_state[state, cut]), a
    return float(best[final_state, -1]), steps[::-1]


def _targets_of(layer):
    """Target state of every move (the inverse of `slots`)."""
    targets = np.zeros(len(layer.sources), np.int64)
    for row, moves in enumerate(layer.slots):
        for j in moves:
            if j < len(layer.sources):
                targets[j] = layer.targets[row]
    return targets


@pytest.mark.parametrize("seed", range(60))
def test_cheapest_cover_matches_the_reference(seed):
    rng = np.random.default_rng(seed)
    sizes = tuple(1 << k for k in range(rng.integers(1, 5)))
    capacities = tuple(int(rng.integers(s, 3 * sizes[-1] + 1)) for s in sizes)
    m = int(rng.integers(2, 9)) if seed % 2 else int(rng.integers(4, 8))
    run = np.arange(m)[None, :] - np.arange(m)[:, None]  # requests in the run (one request per cut here)
    upper = run > 0
    if seed % 2:  # long runs cost more than split ones: covers of several batches of mixed DoPs
        max_batches = int(rng.integers(1, 6))
        batch_costs = (run ** 2)[:, :, None] + rng.integers(0, 3, (m, m, len(sizes))).astype(np.float64)
    else:  # one batch per request, each DoP costing 1 or 2 (or all 1): many equal covers, different moves
        max_batches = m - 1
        capacities = tuple(max_batches * sizes[-1] for _ in sizes)
        single = 1.0 + rng.integers(0, 2, (m, m, len(sizes))) * (seed % 4 == 2)  # or every DoP costs 1
        batch_costs = np.where((run == 1)[:, :, None], single, 100.0 * m)
    batch_costs[~upper] = np.inf
    batch_costs[rng.random(batch_costs.shape) < 0.2] = np.inf  # runs that do not fit
    states, layers = multiset_transitions(sizes, capacities, max_batches)
    skip = None
    if seed % 3:
        skip = np.where(upper, run * rng.integers(1, 4, (m, m)).astype(np.float64), np.inf)
        skip[rng.random(skip.shape) < 0.2] = np.inf  # runs holding a request that must run now
    assert cheapest_cover(batch_costs, skip, states, layers) == reference_cover(batch_costs, skip, states, layers)


def _costs(m: int, dops: int, entries: dict) -> np.ndarray:
    costs = np.full((m, m, dops), np.inf)
    for (start, end, dop_index), cost in entries.items():
        costs[start, end, dop_index] = cost
    return costs


def test_equal_covers_keep_the_first_move_in_dop_order():
    # Two requests; one batch of DoP 2 at most. DoP 2 then DoP 1, or DoP 1 then DoP 2: both cost 3.
    states, layers = multiset_transitions((1, 2), (3, 2), 2)
    costs = _costs(3, 2, {(0, 1, 0): 2, (0, 1, 1): 1, (1, 2, 0): 2, (1, 2, 1): 1})
    expected = (3.0, [CoverStep(1, 0, 1), CoverStep(0, 1, 2)])  # the last batch: the first DoP index
    assert cheapest_cover(costs, None, states, layers) == expected == reference_cover(costs, None, states, layers)


def test_equal_covers_keep_the_first_start_cut():
    states, layers = multiset_transitions((1,), (1,), 1)
    costs = _costs(4, 1, {(0, 1, 0): 1, (0, 2, 0): 2})
    skip = np.full((4, 4), np.inf)
    skip[1, 3], skip[2, 3] = 2, 1  # defer requests 1-2 after a batch of request 0, or request 2 after 0-1
    expected = (3.0, [CoverStep(0, 0, 1), CoverStep(None, 1, 3)])
    assert cheapest_cover(costs, skip, states, layers) == expected == reference_cover(costs, skip, states, layers)


@pytest.mark.parametrize("seed", range(30))
def test_a_wider_candidate_reusing_the_last_tables_gets_what_a_fresh_pass_gets(seed):
    """`CoverReuse`: a pass on more capacity (a wider candidate set) after one on less, with the same costs,
    copies the common multisets' rows and computes the rest: the same cover as a fresh pass, tables and
    all. Other costs are not reused."""
    rng = np.random.default_rng(seed)
    sizes = tuple(1 << k for k in range(rng.integers(1, 5)))
    narrow = tuple(int(rng.integers(s, 2 * sizes[-1] + 1)) for s in sizes)
    wide = tuple(c + int(rng.integers(0, 2 * s + 1)) for c, s in zip(narrow, sizes))
    m, max_batches = int(rng.integers(3, 9)), int(rng.integers(1, 6))
    run = np.arange(m)[None, :] - np.arange(m)[:, None]
    batch_costs = (run ** 2)[:, :, None] + rng.integers(0, 3, (m, m, len(sizes))).astype(np.float64)
    batch_costs[run <= 0] = np.inf
    skip = np.where(run > 0, run * rng.integers(1, 4, (m, m)).astype(np.float64), np.inf) if seed % 2 else None
    reuse = CoverReuse()
    cheapest_cover(batch_costs, skip, *multiset_transitions(sizes, narrow, max_batches), reuse)
    narrow_tables = reuse.tables
    states, layers = multiset_transitions(sizes, wide, max_batches)
    fresh = CoverReuse()
    assert cheapest_cover(batch_costs, skip, states, layers, reuse) == cheapest_cover(
        batch_costs, skip, states, layers, fresh)
    for reused, computed in zip(reuse.tables, fresh.tables):
        assert np.array_equal(reused, computed)
    other = batch_costs + 1.0  # other costs: nothing is copied from the last pass
    assert not CoverReuse(batch_costs, skip, states, narrow_tables).seed(
        tuple(np.zeros_like(t) for t in fresh.tables), states, other, skip).any()
    assert cheapest_cover(other, skip, states, layers, reuse) == reference_cover(other, skip, states, layers)
