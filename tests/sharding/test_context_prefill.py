"""Chunked prefill with context: prompts prefilled in 2-3 chunks, one batch
after another, each chunk's KV kept on different members, give the same
last-token logits as the single-device model, the pools hold exactly the
placed tokens, and the distributed decode that follows gives the reference
tokens. Without any prefix the program is the plain ring prefill.
"""

from __future__ import annotations

import warnings

import jax
import numpy as np
import pytest
from flax import nnx

from loong_jax.models.config import ModelConfig
from loong_jax.models.generate import generate
from loong_jax.models.llama import init_model
from loong_jax.executor.programs import context_prefill_program, decode_program, prefill_program
from loong_jax.sharding.context_prefill import chunk_layout, layout_context
from loong_jax.sharding.decode_program import layout_decode_batch
from loong_jax.sharding.kv_pool import PoolShape, assemble_group_pool, create_pool, split_group_pool
from loong_jax.sharding.prefill_program import make_prefill_inputs
from loong_jax.sharding.stripe_layout import keep_round_robin, place_densely
from loong_jax.sharding.topology import Topology, buffer_pointers, group_params, place_params
from tests.models.attention_reference import empty_kv_record, recording_dense_attention
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
PAGES, PAGE_SIZE, MAX_PAGES, REQUESTS_BUCKET, BATCH_LOCAL = 32, 4, 8, 3, 3
MEMBER_PAGES = 32  # decode bucket: page entries per member


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

    @jax.jit
    def run(state, tokens, positions, segments):
        model = nnx.merge(graphdef, state)
        _, kept = model(tokens, positions, segments, attention=recording_dense_attention,
                        kv_cache=empty_kv_record(model.config, tokens.shape[0]))
        return kept  # [layers, 2, tokens, kvh, hd]

    graphdef, state = nnx.split(model)
    segments = np.concatenate([np.full(n, r) for r, n in enumerate(PROMPT_LENGTHS)]).astype(np.int32)
    positions = np.concatenate([np.arange(n) for n in PROMPT_LENGTHS]).astype(np.int32)
    stream_kv = np.asarray(run(state, np.concatenate(prompts), positions, segments))
    return [stream_kv[:, :, segments == r] for r in range(len(PROMPT_LENGTHS))]


@pytest.fixture(scope="module")
def setups(model):
    """Per (group, tp, pages_per_visit): topology, mesh, weights on the group and
    the compiled context prefill program (shared by the tests below)."""
    graphdef, state = nnx.split(model)
    cache = {}

    def get(group, tp, pages_per_visit):
        key = (group, tp, pages_per_visit)
        if key not in cache:
            topology = Topology(jax.devices(), tp)
            mesh = topology.group_mesh(group)
            cache[key] = dict(topology=topology, mesh=mesh, graphdef=graphdef,
                              params=group_params(place_params(state, topology), topology, group),
                              program=context_prefill_program(graphdef, mesh, pages_per_visit=pages_per_visit))
        return cache[key]

    return get


def nan_pools(topology, group):
    """Fresh pools with NaN in every slot: reading an unwritten slot unmasked poisons the logits."""
    shape = PoolShape.for_model(CONFIG, PAGES, PAGE_SIZE)
    return [create_pool(shape, topology, i, fill=np.nan) for i in group]


def keeping_members(keepers, members):
    return list(dict.fromkeys(k % members for k in keepers))


def rows_bucket(members):
    """One rows_per_member for every batch of SCHEDULE: one compiled program."""
    return max(chunk_layout([(0, n) for _, n, _ in batch], members).rows_per_member for batch in SCHEDULE)


def prepare_batch(batch_chunks, done, prompts, book, members, mesh, slot_of):
    """Host side of one prefill batch of SCHEDULE: layout, placement after what
    the keepers already hold, and the prefix tables. Books each kept token's
    slot in `slot_of[(request, position)] = (member, slot)`."""
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
    placement = place_densely(lengths, keep_member, tables, PAGE_SIZE, held_before)
    assert placement.slot.tolist() == booked
    positions = np.concatenate([np.arange(start, start + n) for start, n in chunks])
    for request, position, member, slot in zip(np.repeat(requests, lengths), positions, keep_member, booked):
        slot_of[(int(request), int(position))] = (int(member), int(slot))
    tokens = np.concatenate([prompts[r][start:start + n] for r, (start, n) in zip(requests, chunks)])
    batch = make_prefill_inputs(layout, tokens, placement, mesh)
    context = layout_context([start for start, _ in chunks], prefix_pages, prefix_lens, members,
                             MAX_PAGES, REQUESTS_BUCKET, PAGE_SIZE).to_device(mesh)
    return requests, chunks, batch, context


def chunked_prefill(program, params, pool, mesh, prompts, book, members, slot_of):
    """Runs SCHEDULE's batches one after another; returns each prompt's
    last-token logits and the pool."""
    done = [0] * len(prompts)
    final_logits = {}
    for batch_chunks in SCHEDULE:
        requests, chunks, batch, context = prepare_batch(batch_chunks, done, prompts, book, members, mesh,
                                                         slot_of)
        donated = pool
        logits, pool = program(params, pool, batch, context)
        assert donated.is_deleted()
        logits = np.asarray(logits)  # [requests, vocab]
        for index, (request, (start, length)) in enumerate(zip(requests, chunks)):
            done[request] = start + length
            if done[request] == len(prompts[request]):
                final_logits[request] = logits[index]
    return [final_logits[r] for r in range(len(prompts))], pool


def greedy_decode(graphdef, params, pool, mesh, book, first_tokens, members):
    decode = decode_program(graphdef, mesh, pages_per_chunk=3)
    tokens = [[t] for t in first_tokens]
    for step in range(DECODE_STEPS):
        rows = [book.decode_row(r, tokens[r][-1], PROMPT_LENGTHS[r] + step, DECODE_MASTERS[r] % members)
                for r in range(len(first_tokens))]
        batch = layout_decode_batch(rows, members, BATCH_LOCAL, MEMBER_PAGES, PAGE_SIZE)
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


# pages_per_visit=2: key tiles of 2 pages, each member's prefix in several tiles (online merge);
# None: tiles of about blocked_attention.KV_TILE tokens (here: all pages in one).
@pytest.mark.parametrize("group,tp,pages_per_visit",
                         [((2,), 1, 2), ((5, 1), 1, 2), ((7, 2, 4, 0), 1, 2), ((3, 1), 2, None)])
def test_chunked_prefill_then_decode_matches_reference(setups, prompts, reference, reference_kv, group, tp,
                                                       pages_per_visit):
    setup = setups(group, tp, pages_per_visit)
    topology, mesh, program = setup["topology"], setup["mesh"], setup["program"]
    members = len(group)
    pools = nan_pools(topology, group)
    pointers = [buffer_pointers(p) for p in pools]
    book, slot_of = KVBook(members, PAGES, PAGE_SIZE), {}

    with warnings.catch_warnings(), count_compiles() as compiles:
        warnings.simplefilter("error")  # e.g. "donated buffers were not usable"
        last_logits, pool = chunked_prefill(program, setup["params"], assemble_group_pool(pools, mesh), mesh,
                                            prompts, book, members, slot_of)
        pools = split_group_pool(pool, topology, group)
        assert [buffer_pointers(p) for p in pools] == pointers  # every chunk was written in place
        expected = np.stack([r.logits[0] for r in reference])
        assert np.abs(np.stack(last_logits) - expected).max() <= 1e-4 * np.abs(expected).max()
        first_tokens = [int(np.argmax(l)) for l in last_logits]
        assert first_tokens == [r.tokens[0] for r in reference]
        assert_pools_hold_exactly_the_placed_tokens(pools, slot_of, reference_kv, members)
        decoded = greedy_decode(setup["graphdef"], setup["params"], pool, mesh, book, first_tokens, members)
    assert decoded == [r.tokens[1:] for r in reference]
    # Three batches (the first without any prefix) share one bucket: one program.
    assert program._cache_size() == 1 and compiles["context_prefill"] <= 1, compiles


def test_without_prefix_it_is_the_ring_prefill(setups, prompts):
    """A batch of fresh prompts (the schedule's first): the same logits and the
    same pool writes as `programs.prefill_program`."""
    group = (5, 1)
    setup = setups(group, 1, 2)
    topology, mesh = setup["topology"], setup["mesh"]
    _, _, batch, context = prepare_batch(SCHEDULE[0], [0] * len(prompts), prompts,
                                         KVBook(len(group), PAGES, PAGE_SIZE), len(group), mesh, {})
    assert not np.asarray(context.kv_lens).any()
    logits, pool = setup["program"](setup["params"], assemble_group_pool(nan_pools(topology, group), mesh),
                                    batch, context)
    ring_logits, ring_pool = prefill_program(setup["graphdef"], mesh)(
        setup["params"], assemble_group_pool(nan_pools(topology, group), mesh), batch)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ring_logits), rtol=1e-6, atol=1e-6)
    # Equal up to XLA's fusion choices (a few float32 ulps); unwritten slots are NaN in both.
    np.testing.assert_allclose(np.asarray(pool), np.asarray(ring_pool), rtol=1e-6, atol=1e-7)


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
        place_densely([2], np.array([0, 0]), [[[4]]], page_size=4, held_before=np.array([[3]]))
    placement = place_densely([3], np.array([0, -1, 0]), [[[4, 9]]], page_size=4, held_before=np.array([[3]]))
    assert placement.slot[[0, 2]].tolist() == [4 * 4 + 3, 9 * 4 + 0]
