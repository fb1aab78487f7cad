"""Decode inputs kept between steps: a group's last decode step, advanced by one token per request.

A group that decodes the same requests on the same masters step after step changes little between two
steps: each request gains one token on its master (position + 1, the next append slot, its last page entry
one token fuller or, when that page filled, one new entry), and its sampling row's step + 1.
Data flow, inside `UnitInputs.decode`:
  1. `advance(batch, requests)`: if this group's last decode step ran the same requests on the same masters
     with the same sampling parameters, and every request holds exactly one more token, on its master, in the
     same page tables (the master's may have grown at its end), the last step's `DecodeLayout` (and its
     sampling inputs, when `sampling.batch.differs_next_step_in_steps_only`) is advanced with a few numpy
     operations into new arrays, equal to what `layout_decode_batch` and the sampling packers build: tokens,
     positions and steps read from this step's inputs, append slots one further (or a page's first slot),
     page entries one token fuller (or one more). Arrays handed to a program are never written. Else None.
  2. `store(batch, requests, layout, sampling)`: after a None, what the caller built from scratch becomes
     the group's last step (`sampling_built`: the sampling inputs it built after an advance that gave none,
     e.g. rows still masking their stop ids, kept once they can be advanced).
Nothing is invalidated by event: every step compares what determines the kept inputs (request ids, masters,
sampling parameters, tokens held and page table on every instance) with the last step's, so a preemption,
migration, scale-up, new or finished request, changed master or new page table reuses nothing it should not.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from loong_jax.executor.protocol import RequestInputs
from loong_jax.sampling.batch import (GreedyBatch, SamplingBatch, SamplingRow, SamplingSignature,
                                      differs_next_step_in_steps_only)
from loong_jax.sampling.params import SamplingParams
from loong_jax.scheduler.plan import DecodeBatch, RequestId
from loong_jax.sharding.decode_program import DecodeLayout


@dataclasses.dataclass(frozen=True)
class _GroupStep:
    """A group's last decode step and what its inputs were built from, per request in batch order."""

    request_ids: tuple[RequestId, ...]
    masters: tuple[int, ...]  # instances
    # Compared by identity first (the engine hands the same object every step), else by value (parameters
    # that crossed processes; an unseeded row's is given a seed per step there, so it never matches).
    params: tuple[SamplingParams, ...]
    next_kv_tokens: tuple[dict[int, int], ...]  # instance -> tokens held, as the next step must show them
    page_tables: tuple[Mapping[int, tuple[int, ...]], ...]  # instance -> pages, for the instances holding KV
    layout: DecodeLayout
    entry_counts: tuple[int, ...]  # real page entries per member
    # The sampling inputs and their signature, when the next step's differ only in their steps (else None).
    sampling: tuple[SamplingBatch | GreedyBatch, SamplingSignature] | None


class DecodeSteps:
    """The last decode step of each group (see the module docstring)."""

    def __init__(self, page_size: int):
        self.page_size = page_size
        self._last: dict[tuple[int, ...], _GroupStep] = {}
        self.advanced = 0  # steps advanced from the last one (the rest were built from scratch)

    def store(self, batch: DecodeBatch, requests: Mapping[RequestId, RequestInputs], layout: DecodeLayout,
              sampling: SamplingBatch | GreedyBatch, signature: SamplingSignature,
              sampling_rows: Sequence[SamplingRow]) -> None:
        """`layout` and `sampling` were built from scratch for `batch`: keep them as its group's last step."""
        inputs = [requests[request_id] for request_id in batch.request_ids]
        counts = tuple(int(n) for n in np.count_nonzero(layout.entry_tokens, axis=1))
        self._last[batch.group] = _GroupStep(
            tuple(batch.request_ids), tuple(batch.masters), tuple(request.sampling.params for request in inputs),
            tuple({**request.kv_tokens, master: request.kv_tokens[master] + 1}
                  for request, master in zip(inputs, batch.masters)),
            tuple({i: tuple(request.page_tables[i]) for i in request.kv_tokens} for request in inputs),
            layout, counts, None)
        self.sampling_built(batch.group, sampling, signature, sampling_rows)

    def advance(self, batch: DecodeBatch, requests: Mapping[RequestId, RequestInputs]
                ) -> tuple[DecodeLayout, tuple[SamplingBatch | GreedyBatch, SamplingSignature] | None] | None:
        """This step's layout and (sampling inputs, signature) (None: not kept) advanced from the group's
        last step; None when it cannot be (the caller builds from scratch and `store`s)."""
        last = self._last.pop(batch.group, None)  # popped: a failed advance leaves nothing stale behind
        if last is None or last.request_ids != tuple(batch.request_ids) or last.masters != tuple(batch.masters):
            return None
        page_size, layout = self.page_size, last.layout
        member_of = {instance: member for member, instance in enumerate(batch.group)}
        next_kv_tokens, page_tables, tokens, positions, steps, append_slots = [], [], [], [], [], []
        fuller, new_entries = [], []  # (member, row) whose last entry takes the token; (member, row, page)
        for request_id, master, row, params, kv_tokens, tables in zip(
                batch.request_ids, batch.masters, layout.rows, last.params, last.next_kv_tokens, last.page_tables):
            request = requests[request_id]
            sampling = request.sampling
            if (sampling.params is not params and sampling.params != params) or request.kv_tokens != kv_tokens:
                return None  # other sampling, or other tokens held than one more on the master
            if request.page_tables != tables:  # a page taken on the master (else what changed: rebuild)
                tables = _grown_on(request, tables, master)
                if tables is None:
                    return None
            index, table = kv_tokens[master] - 1, tables[master]  # (of the token appended, in its share)
            if index // page_size >= len(table):
                return None  # no page for it (the caller's layout says why)
            page = table[index // page_size]
            append_slots.append(page * page_size + index % page_size)
            if index % page_size:
                fuller.append((member_of[master], row))
            else:  # it starts a page: one more entry on the master
                new_entries.append((member_of[master], row, page))
            page_tables.append(tables)
            next_kv_tokens.append({**kv_tokens, master: kv_tokens[master] + 1})
            output = sampling.output_token_ids
            tokens.append(output[-1])
            positions.append(len(sampling.prompt_token_ids) + len(output) - 1)
            steps.append(len(output))
        entries = _advance_entries(layout, last.entry_counts, fuller, new_entries)
        if entries is None:
            return None
        rows = list(layout.rows)
        token_column, position_column = layout.tokens.copy(), layout.positions.copy()
        slot_column = layout.append_slots.copy()
        token_column[rows], position_column[rows], slot_column[rows] = tokens, positions, append_slots
        entry_rows, entry_pages, entry_tokens, counts = entries
        advanced = DecodeLayout(token_column, position_column, slot_column, entry_rows, entry_pages, entry_tokens,
                                layout.rows)
        sampling = None
        if last.sampling is not None:
            step_column = last.sampling[0].step.copy()
            step_column[rows] = steps
            sampling = (dataclasses.replace(last.sampling[0], step=step_column), last.sampling[1])
        self._last[batch.group] = dataclasses.replace(
            last, next_kv_tokens=tuple(next_kv_tokens), page_tables=tuple(page_tables), layout=advanced,
            entry_counts=counts, sampling=sampling)
        self.advanced += 1
        return advanced, sampling

    def sampling_built(self, group: tuple[int, ...], sampling: SamplingBatch | GreedyBatch,
                       signature: SamplingSignature, sampling_rows: Sequence[SamplingRow]) -> None:
        """After an `advance` that gave no sampling inputs, the ones the caller built (with their rows):
        kept when the next steps' differ only in their steps."""
        last = self._last.get(group)
        if last is not None and differs_next_step_in_steps_only(sampling, sampling_rows):
            self._last[group] = dataclasses.replace(last, sampling=(sampling, signature))


def _grown_on(request: RequestInputs, tables: Mapping[int, tuple[int, ...]],
              master: int) -> dict[int, tuple[int, ...]] | None:
    """The request's page tables (of the instances holding its KV) when only its master's grew at its end
    since `tables`; else None."""
    grown = {instance: tuple(request.page_tables[instance]) for instance in request.kv_tokens}
    if grown.keys() != tables.keys() or any(grown[i] != tables[i] for i in tables if i != master):
        return None
    return grown if grown[master][:len(tables[master])] == tables[master] else None


def _advance_entries(layout: DecodeLayout, counts: Sequence[int], fuller: list[tuple[int, int]],
                     new_entries: list[tuple[int, int, int]]):
    """The page entries [d, E] with one more token in each `fuller` (member, row)'s last entry and one
    entry of one token inserted after each `new_entries` (member, row, page)'s others (entries stay sorted
    by row, as `layout_decode_batch` sorts them); with the new counts. None when they no longer fit E."""
    entry_rows, entry_pages = layout.entry_rows.copy(), layout.entry_pages.copy()
    entry_tokens = layout.entry_tokens.copy()
    counts = list(counts)
    for member in range(entry_rows.shape[0]):
        count = counts[member]
        rows = layout.entry_rows[member, :count]  # sorted by row
        fuller_rows = [row for m, row in fuller if m == member]
        if fuller_rows:  # a row's last entry is just before the first entry of a later row
            entry_tokens[member, np.searchsorted(rows, fuller_rows, side="right") - 1] += 1
        added = sorted((row, page) for m, row, page in new_entries if m == member)
        if not added:
            continue
        if count + len(added) > entry_rows.shape[1]:
            return None
        added_rows = np.asarray([row for row, _ in added], np.int32)
        at = np.searchsorted(rows, added_rows, side="right")
        entry_rows[member, :count + len(added)] = np.insert(rows, at, added_rows)
        entry_pages[member, :count + len(added)] = np.insert(entry_pages[member, :count], at,
                                                             [page for _, page in added])
        entry_tokens[member, :count + len(added)] = np.insert(entry_tokens[member, :count], at, 1)
        counts[member] = count + len(added)
    return entry_rows, entry_pages, entry_tokens, tuple(counts)
