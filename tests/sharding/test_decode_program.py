"""Whole-model distributed decode: greedy tokens equal the single-device reference
(`models.generate`) token for token, while requests' KV is spread over 1, 2
and 4 members, their masters move (scale-up: new tokens go to the new master,
old KV stays), and pages migrate between members (the freed pages are then
overwritten and reused). One compiled program per (group, bucket), pools
donated and updated in place.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding

from loong_jax.models.config import ModelConfig
from loong_jax.models.generate import generate
from loong_jax.models.llama import init_model
from loong_jax.executor.programs import decode_program, migration_program, prefill_program
from loong_jax.sharding.decode_program import DecodeRow, layout_decode_batch, pages_held
from loong_jax.sharding.kv_pool import PoolShape, assemble_group_pool, create_pool, split_group_pool
from loong_jax.sharding.migration import PageTransfer, layout_migration
from loong_jax.sharding.prefill_program import make_prefill_inputs
from loong_jax.sharding.specs import POOL_SPEC
from loong_jax.sharding.stripe_layout import keep_round_robin, place_densely, striped_layout
from loong_jax.sharding.topology import Topology, buffer_pointers, group_params, place_params
from tests.models.attention_reference import empty_kv_record, recording_dense_attention
from tests.sharding.compiles import count_compiles
from tests.sharding.kv_book import KVBook

CONFIG = ModelConfig(model_type="llama", vocab_size=96, hidden_size=64, intermediate_size=128,
                     num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                     max_position_embeddings=256)
PROMPT_LENGTHS = (11, 6, 9)
DECODE_STEPS = 16
PAGES, PAGE_SIZE, BATCH_LOCAL, MAX_PAGES = 32, 4, 2, 8
MEMBER_PAGES = 32  # decode bucket: page entries per member, for every step of the run
MEMBERS = 4
# Members keeping each prompt's KV (request 0 on one member, 1 on two, 2 on all four),
# and each request's master per decode step: request 1 scales up once, request 2
# gets a new master every 4 steps, so its new tokens land on all four members.
PROMPT_KEEPERS = ((0,), (1, 2), (0, 1, 2, 3))
MASTERS = (lambda step: 0, lambda step: 1 if step < 8 else 3, lambda step: (3, 0, 1, 2)[step // 4])
# Before this step, request 1's pages on member 2 migrate to member 0; member 2 then
# reuses the freed pages for request 2's new tokens (it is request 2's master from step 12).
MIGRATE_BEFORE_STEP, MIGRATED_REQUEST, MIGRATE_FROM, MIGRATE_TO = 12, 1, 2, 0
UNWRITTEN = 5.5  # what a fresh pool holds before the prefill writes to it


@pytest.fixture(scope="module")
def model():
    return init_model(CONFIG, seed=3)


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(11)
    return [rng.integers(0, CONFIG.vocab_size, size=n).tolist() for n in PROMPT_LENGTHS]


@pytest.fixture(scope="module")
def reference(model, prompts):
    """Per prompt: the first token (from the prompt) and DECODE_STEPS more, with their logits."""
    return [generate(model, prompt, DECODE_STEPS + 1, return_logits=True) for prompt in prompts]


def dense_prompt_kv(model, prompts):
    """Per prompt: its keys/values [layers, 2, length, kv_heads, head_dim] (RoPE applied)."""
    tokens = np.concatenate(prompts).astype(np.int32)
    positions = np.concatenate([np.arange(len(p)) for p in prompts]).astype(np.int32)
    segments = np.concatenate([np.full(len(p), i) for i, p in enumerate(prompts)]).astype(np.int32)
    graphdef, params = nnx.split(model)

    @jax.jit
    def run(params, tokens, positions, segments):
        model = nnx.merge(graphdef, params)
        _, kept = model(tokens, positions, segments, attention=recording_dense_attention,
                        kv_cache=empty_kv_record(model.config, tokens.shape[0]))
        return kept  # [layers, 2, T, kvh, hd]

    stream_kv = np.asarray(run(params, tokens, positions, segments))
    return [stream_kv[:, :, segments == i] for i in range(len(prompts))]


def fill_pools_from_dense(prompt_kv, book, topology, group):
    """Per-instance pools holding each prompt's KV striped over its keepers (written on the host)."""
    host = np.zeros((len(group), CONFIG.num_layers, 2, PAGES, PAGE_SIZE, CONFIG.num_kv_heads,
                     CONFIG.head_dim), np.float32)
    for request, (kv, keepers) in enumerate(zip(prompt_kv, PROMPT_KEEPERS)):
        for position in range(kv.shape[2]):
            member = keepers[position % len(keepers)]
            slot = book.reserve_slot(request, member)
            host[member, :, :, slot // PAGE_SIZE, slot % PAGE_SIZE] = kv[:, :, position]
    return [jax.device_put(host[m:m + 1], NamedSharding(topology.instance_mesh(i), POOL_SPEC))
            for m, i in enumerate(group)]


@functools.partial(jax.jit, donate_argnames=("pool",))
def overwrite_pages(pool, member, pages):
    """NaN over freed pages (in place): whatever their next owner finds there must not matter."""
    return pool.at[member, :, :, pages].set(jnp.nan)


@dataclasses.dataclass
class DecodeRun:
    tokens: list[list[int]]  # per request, the tokens generated by each decode step
    logits: list[list[np.ndarray]]
    pool: jax.Array
    freed_pages: list[int]  # pages the migration freed on MIGRATE_FROM


def run_decode(graphdef, placed, topology, group, pool, book, first_tokens, prompt_lengths):
    """DECODE_STEPS greedy steps of the three requests on `group` (masters per MASTERS),
    migrating pages before MIGRATE_BEFORE_STEP and scribbling over the freed ones."""
    mesh = topology.group_mesh(group)
    params = group_params(placed, topology, group)
    decode = decode_program(graphdef, mesh, pages_per_chunk=3)  # several chunks per member
    tokens = [[t] for t in first_tokens]
    logits = [[] for _ in first_tokens]
    freed_pages = []
    for step in range(DECODE_STEPS):
        if step == MIGRATE_BEFORE_STEP:
            source_pages, target_pages = book.move(MIGRATED_REQUEST, MIGRATE_FROM, MIGRATE_TO)
            plan = layout_migration([PageTransfer(MIGRATE_FROM, MIGRATE_TO, source_pages, target_pages)],
                                    len(group), MAX_PAGES)
            pool = migration_program(mesh, plan.moves, whole_pages=True)(pool, *plan.to_device(mesh))
            pool = overwrite_pages(pool, MIGRATE_FROM, np.asarray(source_pages, np.int32))
            freed_pages = source_pages
        rows = [book.decode_row(r, tokens[r][-1], prompt_lengths[r] + step, MASTERS[r](step))
                for r in range(len(first_tokens))]
        batch = layout_decode_batch(rows, len(group), BATCH_LOCAL, MEMBER_PAGES, PAGE_SIZE)
        step_logits, pool = decode(params, pool, batch.to_device(mesh))
        step_logits = np.asarray(step_logits)
        for request, row in enumerate(batch.rows):
            logits[request].append(step_logits[row])
            tokens[request].append(int(np.argmax(step_logits[row])))
    return DecodeRun([t[1:] for t in tokens], logits, pool, freed_pages)


def assert_matches_reference(run, reference):
    for request, expected in enumerate(reference):
        assert run.tokens[request] == expected.tokens[1:], request
        error = np.abs(np.stack(run.logits[request]) - expected.logits[1:]).max()
        assert error <= 1e-4 * np.abs(expected.logits[1:]).max(), (request, error)


def assert_spread_and_reuse(run, book):
    # Request 2's new tokens went to all four masters, request 1's to two; request 1's
    # pages left member 2, and member 2 reused one of them for request 2.
    assert set(book.request_lens(2)) == {0, 1, 2, 3}
    assert book.request_lens(1) == {MIGRATE_TO: 3, 1: 3 + 8, 3: 8}
    assert set(run.freed_pages) & set(book.request_pages(2)[MIGRATE_FROM])


def test_decode_matches_reference_with_scale_up_and_migration(model, prompts, reference):
    """Prompt KV written into the pools on the host (from the dense model), tp = 2."""
    topology = Topology(jax.devices(), tp=2)
    group = (3, 1, 0, 2)  # any order of instances
    mesh = topology.group_mesh(group)
    graphdef, state = nnx.split(model)
    book = KVBook(MEMBERS, PAGES, PAGE_SIZE)
    pools = fill_pools_from_dense(dense_prompt_kv(model, prompts), book, topology, group)
    pointers = [buffer_pointers(p) for p in pools]

    with warnings.catch_warnings(), count_compiles() as compiles:
        warnings.simplefilter("error")  # e.g. "donated buffers were not usable"
        run = run_decode(graphdef, place_params(state, topology), topology, group,
                         assemble_group_pool(pools, mesh), book, [r.tokens[0] for r in reference],
                         PROMPT_LENGTHS)
    assert_matches_reference(run, reference)
    assert_spread_and_reuse(run, book)
    # One program per bucket: 16 steps, master changes and the migration compiled
    # nothing after the first decode step and the first migration.
    assert compiles["decode"] == 1 and compiles["migrate"] == 1, compiles
    # Everything ran in place: each instance still owns the buffers it started with.
    assert [buffer_pointers(p) for p in split_group_pool(run.pool, topology, group)] == pointers


def test_ring_prefill_then_distributed_decode(model, prompts, reference):
    """Ring prefill on 8 instances whose placement keeps the prompts' KV on 4 of them
    (scale-down); decode continues on those 4 alone, as in the first test."""
    topology = Topology(jax.devices(), tp=1)
    prefill_group = tuple(range(8))
    decode_group = (6, 1, 3, 5)  # decode member m = instance decode_group[m]
    prefill_mesh = topology.group_mesh(prefill_group)
    graphdef, state = nnx.split(model)
    placed = place_params(state, topology)

    # Placement: prompt r's tokens round-robin over its keepers, stored densely in
    # pages the book reserves on those members.
    keepers = [[decode_group[m] for m in members] for members in PROMPT_KEEPERS]
    keep_instance = keep_round_robin(PROMPT_LENGTHS, keepers)  # [total]; prefill member = instance
    segments = np.repeat(np.arange(len(PROMPT_LENGTHS)), PROMPT_LENGTHS)
    book = KVBook(MEMBERS, PAGES, PAGE_SIZE)
    for member, instance in enumerate(decode_group):
        for request in range(len(PROMPT_LENGTHS)):
            for _ in range(int(np.sum((keep_instance == instance) & (segments == request)))):
                book.reserve_slot(request, member)
    page_tables = [[book.pages.get((r, decode_group.index(i)), []) if i in decode_group else []
                    for r in range(len(PROMPT_LENGTHS))] for i in prefill_group]
    placement = place_densely(PROMPT_LENGTHS, keep_instance, page_tables, PAGE_SIZE)
    batch = make_prefill_inputs(striped_layout(PROMPT_LENGTHS, len(prefill_group)),
                               np.concatenate(prompts), placement, prefill_mesh)
    shape = PoolShape.for_model(CONFIG, PAGES, PAGE_SIZE)
    pools = [create_pool(shape, topology, i, fill=UNWRITTEN) for i in prefill_group]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        logits, pool = prefill_program(graphdef, prefill_mesh)(
            group_params(placed, topology, prefill_group), assemble_group_pool(pools, prefill_mesh), batch)
    pools = split_group_pool(pool, topology, prefill_group)

    first_logits = np.asarray(logits)  # [prompts, vocab]
    expected_first = np.stack([r.logits[0] for r in reference])
    assert np.abs(first_logits - expected_first).max() <= 1e-4 * np.abs(expected_first).max()
    first_tokens = [int(t) for t in first_logits.argmax(axis=-1)]
    assert first_tokens == [r.tokens[0] for r in reference]
    # Instances outside the decode group kept nothing, so they leave the group.
    for instance in set(prefill_group) - set(decode_group):
        assert (np.asarray(pools[instance]) == UNWRITTEN).all()

    decode_mesh = topology.group_mesh(decode_group)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run = run_decode(graphdef, placed, topology, decode_group,
                         assemble_group_pool([pools[i] for i in decode_group], decode_mesh), book,
                         first_tokens, PROMPT_LENGTHS)
    assert_matches_reference(run, reference)
    assert_spread_and_reuse(run, book)


def test_layout_decode_batch_puts_requests_in_their_masters_blocks_and_rejects_misfits():
    row = DecodeRow(token=7, position=30, master=1, append_slot=9, pages={1: [2], 0: [4, 5]},
                    kv_lens={1: 2, 0: 5})
    other = DecodeRow(token=3, position=4, master=0, append_slot=1, pages={0: [0, 6]}, kv_lens={0: 4})
    assert pages_held([row, other], members=2, page_size=4) == 3
    batch = layout_decode_batch([row, dataclasses.replace(row, token=8), other], members=2, batch_local=2,
                                member_pages=6, page_size=4)
    assert batch.rows == (2, 3, 0)
    assert batch.tokens.tolist() == [3, 0, 7, 8] and batch.append_slots.tolist() == [1, -1, 9, 9]
    # Per member, one entry per page holding tokens (a page past the held ones is skipped), sorted
    # by row; padding entries name the last row and hold nothing.
    assert batch.entry_rows[0].tolist() == [0, 2, 2, 3, 3, 3]
    assert batch.entry_pages[0].tolist() == [0, 4, 5, 4, 5, 0]
    assert batch.entry_tokens[0].tolist() == [4, 4, 1, 4, 1, 0]
    assert batch.entry_rows[1].tolist() == [2, 3, 3, 3, 3, 3]
    assert batch.entry_pages[1].tolist() == [2, 2, 0, 0, 0, 0]
    assert batch.entry_tokens[1].tolist() == [2, 2, 0, 0, 0, 0]
    with pytest.raises(ValueError, match="more than 1"):
        layout_decode_batch([row, row], members=2, batch_local=1, member_pages=3, page_size=4)
    with pytest.raises(ValueError, match="bucket"):
        layout_decode_batch([row], members=2, batch_local=1, member_pages=1, page_size=4)
    with pytest.raises(ValueError, match="do not fit"):
        layout_decode_batch([row], members=2, batch_local=1, member_pages=3, page_size=2)
    with pytest.raises(ValueError, match="outside"):
        layout_decode_batch([dataclasses.replace(row, kv_lens={1: 1, 2: 3})], 2, 1, 3, 4)
    with pytest.raises(ValueError, match="append slot"):
        layout_decode_batch([dataclasses.replace(row, kv_lens={0: 5})], 2, 1, 3, 4)
