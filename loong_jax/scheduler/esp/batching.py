"""ESP step 3, batching: split admitted prompts into prefill batches, each with a degree of parallelism.

Objective: the sum over requests of normalised latency, time / input length. All batches start now on
disjoint groups, so a batch b of DoP d costs T_d(b) · W(b), with T_d = A_d + B_d·Σl + C_d·Σl² (+ the compile
time when no ready program of that size fits it) and W(b) = Σ 1/l over its requests.

Data flow:
  1. Requests are sorted by length, longest first; a batch is a consecutive run of that order (similar
     lengths batch together — the monotonicity that makes a 1-D split enough).
  2. Split points are compressed to at most `max_boundaries` (every one of the longest requests may stand
     alone; the short tail is cut at equal-count quantiles), and a batch's cost for every (start, end, d) is a
     matrix from prefix sums (Σl, Σl², Σ1/l, Σpages).
  3. The DP state is the multiset of DoPs used so far (bounded family: powers of two). A multiset is feasible
     exactly when, for each size s, the instances asked by batches of DoP >= s fit in the free blocks of
     size >= s (aligned groups pack largest first). States are processed in layers (number of batches);
     each layer and DoP is one vectorised min-plus product over split points.
  4. Optionally a run of requests may be deferred (left waiting) at a cost the caller gives per request: a
     step that adds no batch, so each layer is closed under it after its moves. (Without it, a 200K prompt
     that needs both free instances would drag the short prompts behind it into its batch.)
  5. The cheapest state covering every request is unwound into batches (and deferred requests);
     `groups.pack_sizes` later turns the DoPs into concrete groups.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Sequence

import numpy as np

INFEASIBLE = np.inf


@dataclass(frozen=True)
class BatchChoice:
    indices: tuple[int, ...]  # positions in the caller's request list
    dop: int
    seconds: float  # estimated prefill time, compile penalty included
    weight: float  # Σ 1/l of its requests


@dataclass(frozen=True)
class BatchingResult:
    batches: tuple[BatchChoice, ...]
    cost: float  # Σ seconds · weight (+ the cost of the deferred requests)
    deferred: tuple[int, ...] = ()  # positions left waiting for a later step

    @property
    def longest_seconds(self) -> float:
        return max((b.seconds for b in self.batches), default=0.0)

    @property
    def shortest_seconds(self) -> float:
        return min((b.seconds for b in self.batches), default=0.0)


def split_points(n: int, max_boundaries: int, singles: int) -> np.ndarray:
    """Candidate batch boundaries over n sorted requests (always includes 0 and n)."""
    if n + 1 <= max_boundaries:
        return np.arange(n + 1)
    singles = min(singles, max_boundaries // 2, n)
    rest = max_boundaries - singles
    tail = np.linspace(singles, n, rest).round().astype(np.int64)
    return np.unique(np.concatenate([np.arange(singles), tail]))


@lru_cache(maxsize=256)
def multiset_transitions(sizes: tuple[int, ...], capacities: tuple[int, ...], max_batches: int):
    """DoP multisets (count tuples over `sizes`) that pack into the free blocks, and the moves between them.

    `capacities[k]` is the number of instances in free blocks of size >= sizes[k]. Returns (states, moves)
    where moves is a list, layer by layer, of (dop, source state ids, target state ids); within one entry
    every target appears once.
    """

    def fits(counts) -> bool:
        for k, s in enumerate(sizes):
            demand = sum(c * size for c, size in zip(counts, sizes) if size >= s)
            if demand > capacities[k]:
                return False
        return True

    empty = tuple(0 for _ in sizes)
    states, ids = [empty], {empty: 0}
    frontier, layers = [empty], []
    for _ in range(max_batches):
        grown_frontier = []
        layer_moves = {d: ([], []) for d in sizes}
        for counts in frontier:
            for k, d in enumerate(sizes):
                grown = counts[:k] + (counts[k] + 1,) + counts[k + 1:]
                if not fits(grown):
                    continue
                if grown not in ids:
                    ids[grown] = len(states)
                    states.append(grown)
                    grown_frontier.append(grown)
                layer_moves[d][0].append(ids[counts])
                layer_moves[d][1].append(ids[grown])
        moves = tuple((d, np.array(sources), np.array(targets))
                      for d, (sources, targets) in layer_moves.items() if sources)
        if not moves:
            break
        layers.append(moves)
        frontier = grown_frontier
    return tuple(states), tuple(layers)


def plan_batches(
    lengths: Sequence[int],
    pages: Sequence[int],
    cost,
    sizes: Sequence[int],
    threshold_capacity: dict[int, int],
    pages_capacity: dict[int, int],
    *,
    max_batches: int = 8,
    max_boundaries: int = 24,
    penalty: Callable[[int, int], float] | None = None,
    max_tokens_per_instance: int | None = None,
    defer_costs: Sequence[float] | None = None,
    squares: Sequence[float] | None = None,
    normalizers: Sequence[float] | None = None,
) -> BatchingResult | None:
    """Best split of the requests into batches with DoPs (and, with `defer_costs`, requests left for later);
    None when they cannot be placed.

    `sizes`: DoPs allowed (ascending); `threshold_capacity[s]`: instances in free blocks of size >= s;
    `pages_capacity[d]`: the most free pages any allowed group of size d has; `penalty(d, tokens)`: extra
    seconds (compile) for a batch of that DoP and token count; `defer_costs[i]`: what leaving request i
    waiting costs in the objective's units (inf: it must run now; None: every request must run now);
    `squares[i]`: request i's quadratic attention term (default lengths[i]²; a prefix-cache hit computing
    `lengths[i]` tokens after `h` cached ones attends (h + lengths[i])² − h²); `normalizers[i]`: the length
    request i's latency is normalised by (default lengths[i]; a hit's whole prompt, as its deferral cost is).
    """
    n = len(lengths)
    if n == 0:
        return BatchingResult((), 0.0)
    sizes = [s for s in sizes if threshold_capacity.get(s, 0) >= s]
    if not sizes:
        return None
    order = np.argsort(-np.asarray(lengths, dtype=np.float64), kind="stable")
    sorted_lengths = np.asarray(lengths, dtype=np.float64)[order]
    sorted_pages = np.asarray(pages, dtype=np.float64)[order]
    cuts = split_points(n, max_boundaries, singles=2 * max_batches)
    m = len(cuts)

    def prefix(values: np.ndarray) -> np.ndarray:
        return np.concatenate([[0.0], np.cumsum(values)])[cuts]

    sorted_squares = sorted_lengths ** 2 if squares is None else np.asarray(squares, dtype=np.float64)[order]
    sorted_normalizers = sorted_lengths if normalizers is None else np.asarray(normalizers, np.float64)[order]
    sum_l, sum_sq, sum_w, sum_pages = (prefix(sorted_lengths), prefix(sorted_squares),
                                       prefix(1.0 / sorted_normalizers), prefix(sorted_pages))
    d_l = sum_l[None, :] - sum_l[:, None]  # [start cut, end cut]
    d_sq = sum_sq[None, :] - sum_sq[:, None]
    d_w = sum_w[None, :] - sum_w[:, None]
    d_pages = sum_pages[None, :] - sum_pages[:, None]
    forward = np.triu(np.ones((m, m), dtype=bool), k=1)
    seconds_by_dop, cost_by_dop = {}, {}
    for d in sizes:
        c = cost.prefill[d]
        seconds = c.constant + c.per_token * d_l + c.per_token_squared * d_sq
        if penalty is not None:
            for a in range(m):
                for b in range(a + 1, m):
                    seconds[a, b] += penalty(d, int(d_l[a, b]))
        ok = forward & (d_pages <= pages_capacity.get(d, 0))
        if max_tokens_per_instance is not None:
            ok &= d_l <= d * max_tokens_per_instance
        seconds_by_dop[d] = seconds
        cost_by_dop[d] = np.where(ok, seconds * d_w, INFEASIBLE)

    skip = None  # [start cut, end cut]: cost of leaving that run of requests waiting (dop 0 = deferred)
    if defer_costs is not None:
        sorted_defer = np.asarray(defer_costs, dtype=np.float64)[order]
        blocked = prefix(np.isinf(sorted_defer).astype(np.float64))
        finite = prefix(np.where(np.isinf(sorted_defer), 0.0, sorted_defer))
        skip = np.where(forward & (blocked[None, :] == blocked[:, None]), finite[None, :] - finite[:, None], INFEASIBLE)

    states, layers = multiset_transitions(tuple(sizes), tuple(threshold_capacity[d] for d in sizes), max_batches)
    best = np.full((len(states), m), INFEASIBLE)  # [state, cut]: cheapest cover of requests before the cut
    best[0, 0] = 0.0
    parent_state = np.zeros((len(states), m), np.int64)
    parent_dop = np.zeros((len(states), m), np.int64)
    parent_cut = np.zeros((len(states), m), np.int64)

    def relax(targets: np.ndarray, sources: np.ndarray, d: int, matrix: np.ndarray) -> None:
        totals = best[sources][:, :, None] + matrix[None, :, :]  # [moves, from cut, to cut]
        from_cut = totals.argmin(axis=1)  # [moves, to cut]
        values = totals.min(axis=1)
        improve = values < best[targets]
        if improve.any():
            rows, cols = np.nonzero(improve)
            target_rows = targets[rows]
            best[target_rows, cols] = values[rows, cols]
            parent_state[target_rows, cols] = sources[rows]
            parent_dop[target_rows, cols] = d
            parent_cut[target_rows, cols] = from_cut[rows, cols]

    if skip is not None:
        relax(np.array([0]), np.array([0]), 0, skip)
    for layer in layers:
        for d, sources, targets in layer:
            relax(targets, sources, d, cost_by_dop[d])
        if skip is not None:  # deferral adds no batch: close this layer's states under it (costs add up)
            reached = np.unique(np.concatenate([targets for _, _, targets in layer]))
            relax(reached, reached, 0, skip)
    final_state = int(best[:, -1].argmin())
    final_cost = float(best[final_state, -1])
    if not np.isfinite(final_cost):
        return None
    batches, deferred = [], []
    state, cut = final_state, m - 1
    while cut > 0:
        d, a = int(parent_dop[state, cut]), int(parent_cut[state, cut])
        indices = tuple(int(i) for i in order[cuts[a]:cuts[cut]])
        if d == 0:
            deferred.extend(indices)
        else:
            batches.append(BatchChoice(indices, d, float(seconds_by_dop[d][a, cut]), float(d_w[a, cut])))
        state, cut = int(parent_state[state, cut]), a
    batches.reverse()
    return BatchingResult(tuple(batches), float(final_cost), tuple(sorted(deferred)))
