"""Chunked prefill with context: prompts prefilled in 2-3 chunks, one batch
after another, each chunk's KV kept on different members, give the same
last-token logits as the single-device model, the pools hold exactly the
placed tokens, and the distributed decode that follows gives the reference
tokens. Without any prefix the program is the plain ring prefill.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from loong_jax.models.attention import dense_attention
from loong_jax.models.config import ModelConfig
from loong_jax.models.generate import generate
from loong_jax.models.llama import init_model
from loong_jax.sharding.context_prefill import (
    chunk_layout, jit_context_prefill, layout_context, place_after_held)
from loong_jax.sharding.decode_program import jit_decode, layout_decode_batch
from loong_jax.sharding.kv_pool import PoolShape, assemble_group_pool, create_pool, split_group_pool
from loong_jax.sharding.prefill_program import jit_prefill, make_prefill_batch
from loong_jax.sharding.stripe_layout import keep_round_robin
from loong_jax.sharding.topology import Topology, group_params, place_params
from tests.sharding.compiles import count_compiles
from tests.sharding.kv_book import KVBook

CONFIG = ModelConfig(model_type="llama", vocab_size=96, hidden_size=64, intermediate_size=128,
                     num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=256)
PROMPT_LENGTHS = (13, 6, 10)
# Prefill batches run one after another: (request, chunk length, keeping members).
# Keepers are member indices taken modulo d (-1 = the last member), so the chunks of
# one prompt land on different members whatever the group size.
SCHEDULE = (
    ((0, 5, (0,)), (1, 6, (0, 1, 2, 3))),
    ((2, 4, (1,)), (0, 4, (-1,))),  # a fresh prompt packed with a continued one
    ((0, 4, (0, 1, 2, 3)), (2, 6, (0, -1))),
)
DECODE_MASTERS = (2, 0, -1)  # per request, taken modulo d
DECODE_STEPS = 6
PAGES, PAGE_SIZE, MAX_PAGES, REQUESTS_BUCKET, BATCH_LOCAL = 32, 4, 8, 3, 2
CONTEXT_PAGES_PER_CHUNK = 2  # several chunks per member: exercises the online merge


@pytest.fixture(scope="module")
def model():
    return init_model(CONFIG, seed=3)


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(7)
    return [rng.integers(0, CONFIG.vocab_size, size=n).astype(np.int32) for n in PROMPT_LENGTHS]


@pytest.fixture(scope="module")
def reference(model, prompts):
    """Per prompt: the reference loop's first token and DECODE_STEPS more, with their logits."""
    return [generate(model, prompt.tolist(), DECODE_STEPS + 1, return_logits=True) for prompt in prompts]


@pytest.fixture(scope="module")
def reference_kv(model, prompts):
    """Per prompt: every layer's k, v of its tokens [layers, 2, length, kv_heads, head_dim]."""

    def recording(layer, q, k, v, positions, segment_ids, kept):
        out, _ = dense_attention(layer, q, k, v, positions, segment_ids, None)
        return out, kept + (jnp.stack([k, v]),)

    graphdef, state = nnx.split(model)
    segments = np.concatenate([np.full(n, r) for r, n in enumerate(PROMPT_LENGTHS)]).astype(np.int32)
    positions = np.concatenate([np.arange(n) for n in PROMPT_LENGTHS]).astype(np.int32)
    _, kept = nnx.merge(graphdef, state)(np.concatenate(prompts), positions, segments,
                                         attention=recording, kv_cache=())
    stream_kv = np.asarray(jnp.stack(kept))  # [layers, 2, tokens, kvh, hd]
    return [stream_kv[:, :, segments == r] for r in range(len(PROMPT_LENGTHS))]


def keeping_members(keepers, members):
    return list(dict.fromkeys(k % members for k in keepers))


def rows_bucket(members):
    """One rows_per_member for every batch of SCHEDULE: one compiled program."""
    return max(chunk_layout([(0, n) for _, n, _ in batch], members).rows_per_member for batch in SCHEDULE)


def chunked_prefill(program, params, pool, mesh, prompts, book, members, slot_of):
    """Runs SCHEDULE's batches one after another. Books each kept token's slot in
    `slot_of[(request, position)] = (member, slot)`; returns each prompt's
    last-token logits and the pool."""
    done = [0] * len(prompts)
    final_logits = {}
    for batch_chunks in SCHEDULE:
        requests = [r for r, _, _ in batch_chunks]
        chunks = [(done[r], n) for r, n, _ in batch_chunks]
        lengths = [n for _, n in chunks]
        layout = chunk_layout(chunks, members, rows_bucket(members))
        keep_member = keep_round_robin(lengths, [keeping_members(k, members) for _, _, k in batch_chunks])
        prefix_pages = [book.request_pages(r) for r in requests]
        prefix_lens = [book.request_lens(r) for r in requests]
        held_before = np.array([[book.held.get((r, m), 0) for r in requests] for m in range(members)])
        # The book reserves the slots the way an allocator would; the placement
        # helper must derive the same slots from the page tables and held counts.
        booked = [book.reserve_slot(r, m) for r, m in zip(np.repeat(requests, lengths), keep_member)]
        tables = [[book.pages.get((r, m), []) for r in requests] for m in range(members)]
        placement = place_after_held(lengths, keep_member, tables, held_before, PAGE_SIZE)
        assert placement.slot.tolist() == booked
        for (request, (start, length)), member_slots in zip(
                zip(requests, chunks), np.split(np.stack([keep_member, booked], 1), np.cumsum(lengths)[:-1])):
            for position, (member, slot) in zip(range(start, start + length), member_slots):
                slot_of[(request, position)] = (int(member), int(slot))

        tokens = np.concatenate([prompts[r][start:start + n] for r, (start, n) in zip(requests, chunks)])
        batch = make_prefill_batch(layout, tokens, placement, mesh)
        context = layout_context([start for start, _ in chunks], prefix_pages, prefix_lens, members,
                                 MAX_PAGES, REQUESTS_BUCKET, PAGE_SIZE).to_device(mesh)
        donated = pool
        logits, pool = program(params, pool, batch, context)
        assert donated.is_deleted()
        for index, (request, (start, length)) in enumerate(zip(requests, chunks)):
            done[request] = start + length
            if done[request] == len(prompts[request]):
                final_logits[request] = np.asarray(logits[index])
    return [final_logits[r] for r in range(len(prompts))], pool


def greedy_decode(graphdef, params, pool, mesh, book, first_tokens, members):
    decode = jit_decode(graphdef, mesh, pages_per_chunk=3)
    tokens = [[t] for t in first_tokens]
    for step in range(DECODE_STEPS):
        rows = [book.decode_row(r, tokens[r][-1], PROMPT_LENGTHS[r] + step, DECODE_MASTERS[r] % members)
                for r in range(len(first_tokens))]
        batch = layout_decode_batch(rows, members, BATCH_LOCAL, MAX_PAGES)
        step_logits, pool = decode(params, pool, batch.to_device(mesh))
        step_logits = np.asarray(step_logits)
        for request, row in enumerate(batch.rows):
            tokens[request].append(int(np.argmax(step_logits[row])))
    return [t[1:] for t in tokens]


def assert_pools_hold_exactly_the_placed_tokens(pools, slot_of, reference_kv, members):
    for member, pool in enumerate(pools):
        host = np.asarray(pool)[0].reshape(CONFIG.num_layers, 2, PAGES * PAGE_SIZE, CONFIG.num_kv_heads,
                                           CONFIG.head_dim)
        mine = [(r, p, s) for (r, p), (m, s) in slot_of.items() if m == member]
        written = np.zeros(PAGES * PAGE_SIZE, bool)
        written[[s for _, _, s in mine]] = True
        assert np.isnan(host[:, :, ~written]).all()  # never written: still the fresh pool's NaN
        for request, position, slot in mine:
            expected = reference_kv[request][:, :, position]
            np.testing.assert_allclose(host[:, :, slot], expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    kept_members = {m for m, _ in slot_of.values()}
    assert kept_members == set(range(members))


@pytest.mark.parametrize("group,tp", [((2,), 1), ((5, 1), 1), ((7, 2, 4, 0), 1), ((3, 1), 2)])
def test_chunked_prefill_then_decode_matches_reference(model, prompts, reference, reference_kv, group, tp):
    members = len(group)
    topology = Topology(jax.devices(), tp)
    mesh = topology.group_mesh(group)
    graphdef, state = nnx.split(model)
    params = group_params(place_params(state, topology), topology, group)
    # NaN in every slot nobody wrote: reading one unmasked would poison the logits.
    shape = PoolShape.for_model(CONFIG, PAGES, PAGE_SIZE)
    pool = assemble_group_pool([create_pool(shape, topology, i, fill=np.nan) for i in group], mesh)
    book, slot_of = KVBook(members, PAGES, PAGE_SIZE), {}

    with warnings.catch_warnings(), count_compiles() as compiles:
        warnings.simplefilter("error")  # e.g. "donated buffers were not usable"
        program = jit_context_prefill(graphdef, mesh, pages_per_chunk=CONTEXT_PAGES_PER_CHUNK)
        last_logits, pool = chunked_prefill(program, params, pool, mesh, prompts, book, members, slot_of)
        expected = np.stack([r.logits[0] for r in reference])
        assert np.abs(np.stack(last_logits) - expected).max() <= 1e-4 * np.abs(expected).max()
        first_tokens = [int(np.argmax(l)) for l in last_logits]
        assert first_tokens == [r.tokens[0] for r in reference]
        assert_pools_hold_exactly_the_placed_tokens(split_group_pool(pool, topology, group), slot_of,
                                                    reference_kv, members)
        decoded = greedy_decode(graphdef, params, pool, mesh, book, first_tokens, members)
    assert decoded == [r.tokens[1:] for r in reference]
    # Three batches (the first without any prefix) share one bucket: one compile.
    assert compiles["context_prefill"] == 1, compiles


def test_without_prefix_it_is_the_ring_prefill(model, prompts):
    """Fresh prompts only: the same logits and pool writes as `jit_prefill`."""
    topology = Topology(jax.devices(), 1)
    group = (4, 6, 0)
    mesh = topology.group_mesh(group)
    graphdef, state = nnx.split(model)
    params = group_params(place_params(state, topology), topology, group)
    lengths = list(PROMPT_LENGTHS)
    layout = chunk_layout([(0, n) for n in lengths], len(group))
    book = KVBook(len(group), PAGES, PAGE_SIZE)
    keep_member = keep_round_robin(lengths, [[2], [0, 1], [1, 2, 0]])
    for request, member in zip(np.repeat(range(len(lengths)), lengths), keep_member):
        book.reserve_slot(request, member)
    tables = [[book.pages.get((r, m), []) for r in range(len(lengths))] for m in range(len(group))]
    placement = place_after_held(lengths, keep_member, tables, np.zeros((len(group), len(lengths))), PAGE_SIZE)
    batch = make_prefill_batch(layout, np.concatenate(prompts), placement, mesh)
    context = layout_context([0] * len(lengths), [{}] * len(lengths), [{}] * len(lengths), len(group),
                             MAX_PAGES).to_device(mesh)
    shape = PoolShape.for_model(CONFIG, PAGES, PAGE_SIZE)

    def fresh_pool():
        return assemble_group_pool([create_pool(shape, topology, i, fill=-2.0) for i in group], mesh)

    ring_logits, ring_pool = jit_prefill(graphdef, mesh)(params, fresh_pool(), batch)
    logits, pool = jit_context_prefill(graphdef, mesh)(params, fresh_pool(), batch, context)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ring_logits), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(pool), np.asarray(ring_pool))


def test_host_helpers_validate_and_offset_positions():
    layout = chunk_layout([(5, 3), (0, 2)], members=2)
    assert sorted(layout.positions[layout.segment_ids == 0].tolist()) == [5, 6, 7]
    assert layout.positions[layout.row_of_token[:3]].tolist() == [5, 6, 7]
    tables = layout_context([6, 0], [{0: [3, 1], 1: [2]}, {}], [{0: 5, 1: 1}, {}], members=2, max_pages=3,
                            requests=3, page_size=4)
    assert tables.page_tables[0, 0].tolist() == [3, 1, 0] and tables.kv_lens[:, 0].tolist() == [5, 1]
    assert tables.kv_lens[:, 1:].sum() == 0
    with pytest.raises(ValueError, match="starts at"):
        layout_context([7], [{0: [3, 1]}], [{0: 5}], members=2, max_pages=3)
    with pytest.raises(ValueError, match="do not fit"):
        layout_context([5], [{0: [3]}], [{0: 5}], members=2, max_pages=3, page_size=4)
    with pytest.raises(ValueError, match="outside"):
        layout_context([5], [{2: [3, 1]}], [{2: 5}], members=2, max_pages=3)
    with pytest.raises(ValueError, match="too few"):
        place_after_held([2], np.array([0, 0]), [[[4]]], np.array([[3]]), page_size=4)
    placement = place_after_held([3], np.array([0, -1, 0]), [[[4, 9]]], np.array([[3]]), page_size=4)
    assert placement.slot[[0, 2]].tolist() == [4 * 4 + 3, 9 * 4 + 0]
