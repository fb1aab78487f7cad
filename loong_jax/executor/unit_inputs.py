"""Host side of the executor: a plan's work unit + its step inputs (page tables, tokens) -> a program's inputs.

Everything here is numpy (no device work), so it runs while earlier units still compute.

Data flow, per unit (`UnitInputs.prefill` / `decode` / `migration` -> `ProgramCall`):
  1. PrefillBatch: the prompts (or prompt chunks) are striped over the group's members
     (`context_prefill.chunk_layout`: token j of a chunk on member j mod d, at its global position); the
     plan's placement segments say which member keeps each token's KV, and that member's pages of the
     request (from its `RequestInputs`) give its flat slot (dense per request and member). A chunk that continues
     a prompt also gets, per member, the pages and token counts of the prompt's earlier KV (`layout_context`).
  2. DecodeBatch: one `DecodeRow` per request in its master's block: the newest token, its position, the
     slot of its KV on the master (allocated by `state.on_dispatched`), and every member's pages and token
     counts of the request, flattened per member into the ragged page entries the batch holds there
     (`layout_decode_batch`; the bucket counts the busiest member's pages, not batch x longest request).
     When the group's last decode step ran the same requests and each only moved on by one token, its
     inputs are advanced instead of rebuilt (`decode_steps.DecodeSteps`: same arrays, less host work).
  3. MigrationBatch: the unit's migration tickets give, for every moved token, its slot on the source and its
     slot on the destination (a share appended after the destination's own tokens may start mid-page).
  4. Each request that samples gets its `SamplingRow` at its output row (padding rows are greedy); the
     rows become a `SamplingBatch` (a `GreedyBatch` when all are plain greedy) whose static shapes
     (`sampling.batch.sampling_signature`) are part of the program key.
Every dimension is padded to a power-of-two bucket (`Buckets`), so few distinct programs exist.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Mapping, Sequence

import numpy as np

from loong_jax.executor.decode_steps import DecodeSteps
from loong_jax.executor.program_cache import ProgramKey
from loong_jax.executor.protocol import MigrationTicket, RequestInputs
from loong_jax.sampling.batch import (GreedyBatch, SamplingBatch, SamplingRow, SamplingSignature, greedy_batch,
                                      is_plain_greedy, pack_sampling_batch, sampling_signature)
from loong_jax.sampling.params import SamplingParams
from loong_jax.scheduler.plan import DecodeBatch, MigrationBatch, PrefillBatch, RequestId
from loong_jax.sharding.context_prefill import ContextInputs, chunk_layout, layout_context
from loong_jax.sharding.decode_program import DecodeRow, layout_decode_batch, pages_held
from loong_jax.sharding.prefill_program import PrefillInputs
from loong_jax.sharding.stripe_layout import Placement, rows_needed, striped_members

# Rows that pad a sampling batch: greedy, never read back.
PADDING_ROW = SamplingRow(SamplingParams(temperature=0.0, max_tokens=1, seed=0), (), ())


@dataclasses.dataclass(frozen=True)
class Buckets:
    """Smallest shape of each program dimension; larger needs round up to the next power of two."""

    prefill_rows: int = 16  # token rows per group member
    prefill_requests: int = 8  # prompts (sampled rows) per prefill batch
    decode_batch: int = 8  # requests per master (rows per member)
    decode_pages: int = 8  # pages of one request on one member (decode: x decode_batch pages per member)
    migration_slots: int = 64  # token slots moved by one migration unit

    def round(self, need: int, minimum: int) -> int:
        return 1 << (max(need, minimum, 1) - 1).bit_length()


@dataclasses.dataclass
class ProgramCall:
    """One program of a unit, ready to run: its key and host inputs."""

    key: ProgramKey
    inputs: tuple  # positional inputs after (params, pool), numpy pytrees
    sampled: list[tuple[RequestId, int]]  # (request, row of the sampler output) of requests taking a token
    sampling_rows: list[SamplingRow]  # one per sampler output row, padding included
    next_key: ProgramKey | None = None  # a program these requests will need soon (compiled in the background)


def _flat_slots(pages: Sequence[int], first: int, count: int, page_size: int) -> np.ndarray:
    """[count] flat slots of the tokens first..first+count-1 of a share stored densely in `pages`."""
    pages_array = np.asarray(pages, dtype=np.int64)
    index = first + np.arange(count)
    return (pages_array[index // page_size] * page_size + index % page_size).astype(np.int32)


class UnitInputs:
    """Builds `ProgramCall`s from plan units and the `RequestInputs` of their requests (numpy only)."""

    def __init__(self, buckets: Buckets, page_size: int, vocab_size: int, eos_token_ids: Sequence[int],
                 keep_decode_steps: bool = True):
        """keep_decode_steps: advance each group's last decode inputs when only its tokens moved on
        (`decode_steps`); False builds every step from scratch (what the tests compare it with)."""
        self.buckets = buckets
        self.decode_steps = DecodeSteps(page_size) if keep_decode_steps else None
        self.page_size = page_size
        self.vocab_size = vocab_size
        self.eos_token_ids = tuple(eos_token_ids)

    def _slots(self, request: RequestInputs, instance: int, first: int, count: int) -> np.ndarray:
        return _flat_slots(request.page_tables[instance], first, count, self.page_size)

    def _sampling(self, rows: list[SamplingRow],
                  batch_rows: int) -> tuple[SamplingBatch | GreedyBatch, SamplingSignature]:
        rows = list(rows) + [PADDING_ROW] * (batch_rows - len(rows))
        if is_plain_greedy(rows):
            batch = greedy_batch(rows, self.vocab_size, self.eos_token_ids)
        else:
            batch = pack_sampling_batch(rows, self.vocab_size, self.eos_token_ids, batch_bucket=batch_rows)
        return batch, sampling_signature(rows, batch)

    def prefill(self, batch: PrefillBatch, request_inputs: Mapping[RequestId, RequestInputs]) -> ProgramCall:
        """A ring prefill of the batch's chunks; chunks that continue a prompt (start > 0) also attend to
        the KV their earlier chunks left in the group (`context_prefill`)."""
        group = batch.group
        member_of = {instance: m for m, instance in enumerate(group)}
        tokens, keep_member, keep_slot, prefix_pages, prefix_lens, rows, sampled = [], [], [], [], [], [], []
        for index, (request_id, (start, length), segments) in enumerate(
                zip(batch.request_ids, batch.chunks, batch.placement)):
            request = request_inputs[request_id]
            request_tokens = request.token_ids
            if start + length > len(request_tokens):
                raise ValueError(f"prefill of {request_id!r} covers tokens {start}..{start + length - 1}, "
                                 f"request has {len(request_tokens)}")
            tokens.append(np.asarray(request_tokens[start:start + length], np.int32))
            # The chunk's tokens kept on an instance follow whatever the request held there before.
            placed_here = Counter()
            for instance, n_tokens in segments:
                placed_here[instance] += n_tokens
            held = request.kv_tokens  # this chunk's tokens included
            held_before = {i: n - placed_here[i] for i, n in held.items() if n > placed_here[i]}
            if set(held_before) - set(member_of) or sum(held_before.values()) != start:
                raise ValueError(f"prefill of {request_id!r} at {start}: earlier KV {held_before} is not in {group}")
            prefix_pages.append({member_of[i]: request.page_tables[i] for i in held_before})
            prefix_lens.append({member_of[i]: n for i, n in held_before.items()})
            next_index = {i: held_before.get(i, 0) for i in placed_here}
            for instance, n_tokens in segments:
                keep_member.append(np.full(n_tokens, member_of[instance], np.int32))
                keep_slot.append(self._slots(request, instance, next_index[instance], n_tokens))
                next_index[instance] += n_tokens
            if start + length == len(request_tokens):  # the chunk ends the prompt: it samples a token
                rows.append(request.sampling)
                sampled.append((request_id, index))
            else:
                rows.append(PADDING_ROW)
        b, members, lengths = self.buckets, len(group), [length for _, length in batch.chunks]
        rows_per_member = b.round(rows_needed(striped_members(lengths, members), members), b.prefill_rows)
        layout = chunk_layout(batch.chunks, members, rows_per_member)
        member_rows, slot_rows = Placement(np.concatenate(keep_member), np.concatenate(keep_slot)).rows(layout)
        requests = b.round(len(lengths), b.prefill_requests)
        last_rows = layout.last_token_rows()
        logits_indices = np.concatenate([last_rows, np.full(requests - len(last_rows), last_rows[0])])
        inputs = PrefillInputs(
            tokens=layout.to_rows(np.concatenate(tokens), fill=0), positions=layout.positions,
            segment_ids=layout.segment_ids, placement_member=member_rows.astype(np.int32),
            placement_slot=slot_rows.astype(np.int32), logits_indices=logits_indices.astype(np.int32))
        sampling, signature = self._sampling(rows, requests)
        if all(start == 0 for start, _ in batch.chunks):
            key = ProgramKey("prefill", group, (rows_per_member, requests, signature))
            return ProgramCall(key, (inputs, sampling), sampled, rows)
        most_pages = max((len(p) for pages in prefix_pages for p in pages.values()), default=1)
        max_pages = b.round(most_pages, b.decode_pages)
        tables = layout_context([start for start, _ in batch.chunks], prefix_pages, prefix_lens, members,
                                max_pages, requests=requests, page_size=self.page_size)
        context = ContextInputs(page_tables=tables.page_tables, kv_lens=tables.kv_lens)
        key = ProgramKey("prefill_context", group, (rows_per_member, requests, max_pages, signature))
        return ProgramCall(key, (inputs, context, sampling), sampled, rows)

    def decode(self, batch: DecodeBatch, request_inputs: Mapping[RequestId, RequestInputs]) -> ProgramCall:
        """One multi-master decode step: each request in its master's block of rows (advanced from the
        group's last step when only the requests' tokens moved on: `decode_steps`)."""
        b, members = self.buckets, len(batch.group)
        advanced = None if self.decode_steps is None else self.decode_steps.advance(batch, request_inputs)
        if advanced is not None:
            host, kept_sampling = advanced
            most_pages = int(np.count_nonzero(host.entry_tokens, axis=1).max())
            batch_local, member_pages = len(host.tokens) // members, host.entry_rows.shape[1]
            if b.round(most_pages, b.decode_batch * b.decode_pages) != member_pages:  # (it cannot shrink)
                advanced = None
        if advanced is None:
            host, batch_local, member_pages, most_pages = self._decode_layout(batch, request_inputs)
            kept_sampling = None
        sampling_rows = [PADDING_ROW] * (members * batch_local)
        for request_id, row in zip(batch.request_ids, host.rows):
            sampling_rows[row] = request_inputs[request_id].sampling
        if kept_sampling is not None:
            sampling, signature = kept_sampling
        else:
            sampling, signature = self._sampling(sampling_rows, members * batch_local)
            if self.decode_steps is not None and advanced is None:
                self.decode_steps.store(batch, request_inputs, host, sampling, signature, sampling_rows)
            elif self.decode_steps is not None:
                self.decode_steps.sampling_built(batch.group, sampling, signature, sampling_rows)
        key = ProgramKey("decode", batch.group, (batch_local, member_pages, signature))
        grown = None
        if 4 * most_pages > 3 * member_pages:  # requests grow: the next page bucket will be needed soon
            grown = ProgramKey("decode", batch.group, (batch_local, 2 * member_pages, signature))
        return ProgramCall(key, (host.inputs(), sampling), list(zip(batch.request_ids, host.rows)), sampling_rows,
                           grown)

    def _decode_layout(self, batch: DecodeBatch, request_inputs: Mapping[RequestId, RequestInputs]):
        """The decode batch's rows and page entries built from scratch: (layout, rows per member, page
        entries per member (bucket), page entries of the busiest member)."""
        group, page_size = batch.group, self.page_size
        member_of = {instance: m for m, instance in enumerate(group)}
        rows = []
        for request_id, master in zip(batch.request_ids, batch.masters):
            request = request_inputs[request_id]  # decoding: its newest token is the last generated
            pages, kv_lens = {}, {}
            for instance, held in request.kv_tokens.items():  # tokens, this step's append included
                member = member_of[instance]
                pages[member], kv_lens[member] = request.page_tables[instance], held
            master_member = member_of[master]
            index, master_pages = kv_lens[master_member] - 1, pages[master_member]
            rows.append(DecodeRow(
                token=int(request.sampling.output_token_ids[-1]), position=request.context_len - 1,
                master=master_member,
                append_slot=master_pages[index // page_size] * page_size + index % page_size,
                pages=pages, kv_lens=kv_lens))
        b, members = self.buckets, len(group)
        busiest_master = max(Counter(row.master for row in rows).values())
        most_pages = pages_held(rows, members, self.page_size)
        batch_local = b.round(busiest_master, b.decode_batch)
        member_pages = b.round(most_pages, b.decode_batch * b.decode_pages)
        return layout_decode_batch(rows, members, batch_local, member_pages, page_size), batch_local, \
            member_pages, most_pages

    def migration(self, batch: MigrationBatch, tickets: Sequence[MigrationTicket]) -> ProgramCall:
        """Token slots to move from the source (member 0) to the destination (member 1)."""
        sources, destinations = [], []
        for ticket in tickets:
            sources.append(_flat_slots(ticket.src_pages, 0, ticket.n_tokens, self.page_size))
            destinations.append(_flat_slots(ticket.dst_pages, ticket.dst_first_slot, ticket.n_tokens, self.page_size))
        send, receive = np.concatenate(sources), np.concatenate(destinations)
        slots = self.buckets.round(len(send), self.buckets.migration_slots)
        send_slots = np.full((2, slots), -1, np.int32)
        receive_slots = np.full((2, slots), -1, np.int32)
        send_slots[0, :len(send)] = send
        receive_slots[1, :len(receive)] = receive
        key = ProgramKey("migrate", (batch.src_instance, batch.dst_instance), (slots,))
        return ProgramCall(key, (send_slots, receive_slots), [], [])
