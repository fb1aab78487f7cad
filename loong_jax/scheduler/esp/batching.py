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
     size >= s (aligned groups pack largest first). The search itself is
     `esp.multiset_dp`: states in layers (number of batches), each layer one vectorised min-plus product.
  4. Optionally a run of requests may be deferred (left waiting) at a cost the caller gives per request: a
     step that adds no batch, so each layer is closed under it after its moves. (Without it, a 200K prompt
     that needs both free instances would drag the short prompts behind it into its batch.)
  5. The cheapest state covering every request is unwound into batches (and deferred requests);
     `groups.pack_sizes` later turns the DoPs into concrete groups.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from loong_jax.scheduler.esp.multiset_dp import INFEASIBLE, CoverReuse, cheapest_cover, multiset_transitions


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
    reuse: CoverReuse | None = None,
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
    `reuse`: shared by the calls of one scheduling step (`multiset_dp.CoverReuse`).
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
    cover = cheapest_cover(np.stack([cost_by_dop[d] for d in sizes], axis=-1), skip, states, layers, reuse)
    if cover is None:
        return None
    final_cost, steps = cover
    batches, deferred = [], []
    for step in steps:
        a, cut = step.start_cut, step.end_cut
        indices = tuple(int(i) for i in order[cuts[a]:cuts[cut]])
        if step.dop_index is None:
            deferred.extend(indices)
        else:
            d = sizes[step.dop_index]
            batches.append(BatchChoice(indices, d, float(seconds_by_dop[d][a, cut]), float(d_w[a, cut])))
    return BatchingResult(tuple(batches), float(final_cost), tuple(sorted(deferred)))
