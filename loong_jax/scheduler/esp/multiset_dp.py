"""The batching DP's search (`esp.batching`): states are multisets of DoPs, steps cover runs of requests.

Data flow:
  1. `multiset_transitions(sizes, capacities, max_batches)` (cached per free-block shape): the DoP multisets
     that pack into the free blocks, and one `LayerMoves` per number of batches (a move adds one batch of one
     DoP to a state of the layer before).
  2. `cheapest_cover(batch_costs, skip, states, layers)`, the forward pass: best[state, cut] is the cheapest
     cover of the requests before `cut` (sorted order) by the state's batches (and deferred runs). Each layer
     is one min-plus product over all of its moves, laid out [from cut, to cut, move] so that numpy's inner
     loops run over the moves (hundreds, contiguous) rather than over the ~24 cuts; then deferral (`skip`, a
     step that adds no batch) closes the layer. Only values are kept, no argmins.
  3. `CoverReuse` carries a forward pass's tables to the next `cheapest_cover` of the same call: the
     candidate prefill sets of one step grow one decode group at a time, so a wider one has every multiset
     of a narrower one, and when the same requests are admitted under the same limits its cost tables are
     the same: a multiset's values depend only on those tables, so they are copied and only the new
     multisets are computed (exactly what a fresh pass would give).
  4. The walk back from the cheapest final state recomputes, at each step, which move and which start cut
     gave the value: among equal costs the first move in DoP order and the first cut, exactly what relaxing
     the moves one DoP after another with strict improvement keeps. That is one small [move, cut] table per
     step instead of an argmin over every move of every layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

INFEASIBLE = np.inf


@dataclass(frozen=True)
class LayerMoves:
    """The moves of one layer (states with one more batch), all DoPs together, listed in DoP order: move j
    goes from state `sources[j]` by a batch of DoP index `dop_index[j]`; `slots[t]` lists the moves into
    `targets[t]` in that order, padded with `len(sources)` (a column of infinite cost)."""

    sources: np.ndarray  # [moves] int64
    dop_index: np.ndarray  # [moves] int64, ascending
    targets: np.ndarray  # [targets] int64, ascending, distinct
    slots: np.ndarray  # [targets, most moves into one target] int64


@dataclass(frozen=True)
class CoverStep:
    """One step of the cheapest cover: requests [start_cut, end_cut) (cut positions) run as a batch of DoP
    index `dop_index`, or are deferred (`dop_index` None)."""

    dop_index: int | None
    start_cut: int
    end_cut: int


@lru_cache(maxsize=256)
def multiset_transitions(sizes: tuple[int, ...], capacities: tuple[int, ...], max_batches: int):
    """DoP multisets (count tuples over `sizes`) that pack into the free blocks, and the moves between them.

    `capacities[k]` is the number of instances in free blocks of size >= sizes[k]. Returns (states, layers):
    one `LayerMoves` per number of batches; states[0] is the empty multiset.
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
        moves_by_dop: dict[int, list[tuple[int, int]]] = {k: [] for k in range(len(sizes))}
        for counts in frontier:
            for k in range(len(sizes)):
                grown = counts[:k] + (counts[k] + 1,) + counts[k + 1:]
                if not fits(grown):
                    continue
                if grown not in ids:
                    ids[grown] = len(states)
                    states.append(grown)
                    grown_frontier.append(grown)
                moves_by_dop[k].append((ids[counts], ids[grown]))
        moves = [(k, source, target) for k, pairs in moves_by_dop.items() for source, target in pairs]
        if not moves:
            break
        layers.append(_layer_moves(moves))
        frontier = grown_frontier
    return tuple(states), tuple(layers)


def _layer_moves(moves: list[tuple[int, int, int]]) -> LayerMoves:
    """`LayerMoves` of (DoP index, source, target) moves listed in DoP order."""
    targets = sorted({target for _, _, target in moves})
    row = {target: t for t, target in enumerate(targets)}
    into: list[list[int]] = [[] for _ in targets]
    for j, (_, _, target) in enumerate(moves):
        into[row[target]].append(j)
    slots = np.full((len(targets), max(len(js) for js in into)), len(moves), np.int64)
    for t, js in enumerate(into):
        slots[t, :len(js)] = js
    return LayerMoves(np.array([source for _, source, _ in moves], np.int64),
                      np.array([k for k, _, _ in moves], np.int64), np.array(targets, np.int64), slots)


@dataclass
class CoverReuse:
    """The last forward pass of one call's candidates (see the module docstring, step 3)."""

    batch_costs: np.ndarray | None = None
    skip: np.ndarray | None = None
    states: tuple = ()  # its multisets (counts), one per row of `tables`
    tables: tuple | None = None  # (best, before_deferral, deferred_last)

    def seed(self, tables, states, batch_costs: np.ndarray, skip: np.ndarray | None) -> np.ndarray:
        """Copy the rows of the multisets the last pass computed on the same costs; [states] bool: copied."""
        known = np.zeros(len(states), bool)
        if self.tables is None or not _same(self.batch_costs, batch_costs) or not _same(self.skip, skip):
            return known
        row_of = {counts: row for row, counts in enumerate(self.states)}
        new_rows = [row for row, counts in enumerate(states) if counts in row_of]
        old_rows = [row_of[states[row]] for row in new_rows]
        for table, old in zip(tables, self.tables):
            table[new_rows] = old[old_rows]
        known[new_rows] = True
        return known

    def keep(self, tables, states, batch_costs: np.ndarray, skip: np.ndarray | None) -> None:
        self.batch_costs, self.skip, self.states, self.tables = batch_costs, skip, states, tables


def _same(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.shape == b.shape and np.array_equal(a, b)


def cheapest_cover(batch_costs: np.ndarray, skip: np.ndarray | None, states, layers,
                   reuse: CoverReuse | None = None) -> tuple[float, list[CoverStep]] | None:
    """(cost, steps in request order) of the cheapest cover of every request, or None if none is finite.

    `batch_costs[from cut, to cut, dop index]`: cost of one batch of those requests at that DoP (inf where it
    does not fit); `skip[from cut, to cut]`: cost of deferring them (None: nothing may be deferred).
    `reuse`: the tables of the last pass (used when its costs are these) and, after, of this one.
    """
    m = batch_costs.shape[0]
    best = np.full((len(states), m), INFEASIBLE)  # [state, cut]
    best[0, 0] = 0.0
    before_deferral = best.copy()  # [state, cut]: best before deferral closed the state's layer
    deferred_last = np.zeros((len(states), m), bool)  # best[state, cut] ends with a deferred run
    tables = (best, before_deferral, deferred_last)
    known = np.zeros(len(states), bool) if reuse is None else reuse.seed(tables, states, batch_costs, skip)
    if skip is not None and not known[0]:
        _close_under_deferral(tables, np.array([0]), skip)
    for layer in layers:
        layer_left = _moves_into_unknown(layer, known)
        if layer_left is None:
            continue
        best[layer_left.targets] = _cheapest_moves(best, layer_left, batch_costs)
        before_deferral[layer_left.targets] = best[layer_left.targets]
        if skip is not None:
            _close_under_deferral(tables, layer_left.targets, skip)
    if reuse is not None:
        reuse.keep(tables, states, batch_costs, skip)
    final_state = int(best[:, -1].argmin())
    final_cost = float(best[final_state, -1])
    if not np.isfinite(final_cost):
        return None
    steps = []
    state, cut = final_state, m - 1
    while cut > 0:
        if deferred_last[state, cut]:
            start = int((before_deferral[state] + skip[:, cut]).argmin())
            steps.append(CoverStep(None, start, cut))
        else:
            layer = layers[sum(states[state]) - 1]  # a state with b batches is reached in layer b
            source, dop_index, start = _cheapest_move_into(best, layer, batch_costs, state, cut)
            steps.append(CoverStep(dop_index, start, cut))
            state = source
        cut = start
    steps.reverse()
    return final_cost, steps


def _moves_into_unknown(layer: LayerMoves, known: np.ndarray) -> LayerMoves | None:
    """The part of `layer` that reaches targets not `known` (None: every target is)."""
    rows = np.flatnonzero(~known[layer.targets])
    if len(rows) == len(layer.targets):
        return layer
    if not len(rows):
        return None
    slots = layer.slots[rows]
    padding = len(layer.sources)
    used = np.unique(slots[slots < padding])  # ascending: DoP order is kept
    remapped = np.where(slots < padding, np.searchsorted(used, slots), len(used))
    return LayerMoves(layer.sources[used], layer.dop_index[used], layer.targets[rows], remapped)


def _cheapest_moves(best: np.ndarray, layer: LayerMoves, batch_costs: np.ndarray) -> np.ndarray:
    """[targets, to cut]: min over the moves into each target and their start cuts."""
    m = batch_costs.shape[0]
    totals = np.take(batch_costs, layer.dop_index, axis=2)  # [from cut, to cut, moves]
    totals += np.ascontiguousarray(best[layer.sources].T)[:, None, :]
    by_move = np.minimum.reduce(totals, axis=0)  # [to cut, moves]
    padded = np.concatenate([by_move, np.full((m, 1), INFEASIBLE)], axis=1).T  # [moves + 1, to cut]
    return padded[layer.slots].min(axis=1)


def _close_under_deferral(tables, targets: np.ndarray, skip: np.ndarray) -> None:
    """Let the states `targets` end with a deferred run (strictly cheaper only): costs add up."""
    best, _, deferred_last = tables
    before = best[targets]  # [targets, cut]
    totals = before.T[:, None, :] + skip[:, :, None]  # [from cut, to cut, targets]
    values = np.minimum.reduce(totals, axis=0).T  # [targets, to cut]
    improve = values < before
    best[targets] = np.where(improve, values, before)
    deferred_last[targets] = improve


def _cheapest_move_into(best: np.ndarray, layer: LayerMoves, batch_costs: np.ndarray, state: int,
                        cut: int) -> tuple[int, int, int]:
    """(source state, DoP index, start cut) of the move that gave best[state, cut]: the first in DoP order
    with the least cost, and its first start cut with that cost (argmin takes the first of equal values)."""
    moves = layer.slots[int(np.searchsorted(layer.targets, state))]
    moves = moves[moves < len(layer.sources)]
    sources, dop_indices = layer.sources[moves], layer.dop_index[moves]
    totals = best[sources] + batch_costs[:, cut, dop_indices].T  # [move, start cut]
    starts = totals.argmin(axis=1)
    move = int(totals[np.arange(len(moves)), starts].argmin())
    return int(sources[move]), int(dop_indices[move]), int(starts[move])
