"""Multi-master decode attention against a float64 dense reference.

Pools are filled on the host: every request keeps its past tokens on one or
several members (up to all of them), its master may or may not hold any of
them (scale-up), padding rows sit in every block, unused slots hold NaN (so a
read of anything not held would show), and the model uses GQA.
"""

from __future__ import annotations

import re
import warnings

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding

from loong_jax.sharding.decode_attention import DecodeKVCache, decode_attention
from loong_jax.sharding.decode_program import layout_decode_batch, pages_held
from loong_jax.sharding.specs import HEADS_SPEC, POOL_SPEC
from loong_jax.sharding.topology import Topology
from tests.sharding.kv_book import KVBook

LAYERS, PAGES, PAGE_SIZE, KV_HEADS, Q_HEADS, HEAD_DIM = 2, 48, 4, 2, 4, 8
LAYER = 1  # the layer attended; layer 0 must stay untouched
BATCH_LOCAL = 3


def dense_reference(q, keys, values):
    """q: [hq, hd]; keys, values: [n, kvh, hd] -> [hq, hd] float64 (GQA)."""
    q, keys, values = (np.asarray(a, np.float64) for a in (q, keys, values))
    group = q.shape[0] // keys.shape[1]
    keys = np.repeat(keys, group, axis=1)  # [n, hq, hd]
    values = np.repeat(values, group, axis=1)
    scores = np.einsum("hd,nhd->hn", q, keys) / np.sqrt(q.shape[-1])
    weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
    weights /= weights.sum(axis=-1, keepdims=True)
    return np.einsum("hn,nhd->hd", weights, values)


def request_specs(members: int, rng):
    """(holders, tokens per holder, master) per request; masters cycle so blocks get padding."""
    spreads = [1, min(2, members), min(3, members), members, 1]
    specs = []
    for i in range(2 * members):
        holders = rng.choice(members, size=spreads[i % len(spreads)], replace=False)
        counts = rng.integers(1, 15, size=len(holders))  # up to 4 pages per member
        specs.append((holders.tolist(), counts.tolist(), i % members))
    # One request spread over 3 members whose master holds none of it yet (a new master).
    if members >= 4:
        specs[0] = ([1, 2, 3], [5, 9, 4], 0)
    return specs


@pytest.mark.parametrize("members,tp", [(1, 1), (2, 1), (3, 1), (4, 1), (8, 1),
                                        (1, 2), (2, 2), (3, 2), (4, 2)])
def test_decode_attention_matches_dense(members, tp):
    rng = np.random.default_rng(100 * members + tp)
    topology = Topology(jax.devices()[:members * tp], tp)
    group = tuple(reversed(range(members)))  # members need not be in instance order
    mesh = topology.group_mesh(group)
    book = KVBook(members, PAGES, PAGE_SIZE)

    pool = np.full((members, LAYERS, 2, PAGES, PAGE_SIZE, KV_HEADS, HEAD_DIM), np.nan, np.float32)
    past = []  # per request: (keys [n, kvh, hd], values) over all members
    rows = []
    for request, (holders, counts, master) in enumerate(request_specs(members, rng)):
        keys, values = [], []
        for member, count in zip(holders, counts):
            for _ in range(count):
                slot = book.reserve_slot(request, member)
                kv = rng.standard_normal((LAYERS, 2, KV_HEADS, HEAD_DIM)).astype(np.float32)
                pool[member, :, :, slot // PAGE_SIZE, slot % PAGE_SIZE] = kv
                keys.append(kv[LAYER, 0])
                values.append(kv[LAYER, 1])
        past.append((np.stack(keys), np.stack(values)))
        rows.append(book.decode_row(request, token=0, position=sum(counts), master=master))
    # Twice the pages the busiest member holds: every member also has padding entries.
    member_pages = 2 * pages_held(rows, members, PAGE_SIZE)
    batch = layout_decode_batch(rows, members, BATCH_LOCAL, member_pages, PAGE_SIZE)
    # Page entries visited one at a time, in chunks of 3 (the last one padded), or all at once.
    pages_per_chunk = (3, 1, member_pages)[(members + tp) % 3]

    total_rows = members * BATCH_LOCAL
    q = rng.standard_normal((total_rows, Q_HEADS, HEAD_DIM)).astype(np.float32)
    k_new = rng.standard_normal((total_rows, KV_HEADS, HEAD_DIM)).astype(np.float32)
    v_new = rng.standard_normal((total_rows, KV_HEADS, HEAD_DIM)).astype(np.float32)

    inputs = batch.to_device(mesh)
    heads = NamedSharding(mesh, HEADS_SPEC)

    def step(q, k, v, pool, entry_rows, entry_pages, entry_tokens, append_slots):
        cache = DecodeKVCache(pool, entry_rows, entry_pages, entry_tokens, append_slots)
        out, cache = decode_attention(LAYER, q, k, v, None, None, cache, mesh=mesh,
                                      pages_per_chunk=pages_per_chunk)
        return out, cache.pool

    args = (jax.device_put(q, heads), jax.device_put(k_new, heads), jax.device_put(v_new, heads),
            jax.device_put(pool, NamedSharding(mesh, POOL_SPEC)), inputs.entry_rows, inputs.entry_pages,
            inputs.entry_tokens, inputs.append_slots)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a "donated buffers were not usable" warning fails the test
        compiled = jax.jit(step, donate_argnames=("pool",)).lower(*args).compile()
        out, new_pool = compiled(*args)
    # Only queries (all-gather) and partials (all-to-all) travel; KV never leaves its member.
    collectives = set(re.findall(r"\b(all-gather|all-to-all|all-reduce|collective-permute|reduce-scatter)"
                                 r"(?:-start)?\(", compiled.as_text()))
    assert collectives == ({"all-gather", "all-to-all"} if members > 1 else set()), collectives
    out, new_pool = np.asarray(out), np.asarray(new_pool)

    expected_pool = pool.copy()
    for request, row in enumerate(batch.rows):
        keys, values = past[request]
        keys = np.concatenate([keys, k_new[row][None]])
        values = np.concatenate([values, v_new[row][None]])
        expected = dense_reference(q[row], keys, values)
        error = np.abs(out[row] - expected).max() / np.abs(expected).max()
        assert error <= 1e-5, (request, error)
        master, slot = rows[request].master, rows[request].append_slot
        expected_pool[master, LAYER, 0, slot // PAGE_SIZE, slot % PAGE_SIZE] = k_new[row]
        expected_pool[master, LAYER, 1, slot // PAGE_SIZE, slot % PAGE_SIZE] = v_new[row]
    padding = sorted(set(range(total_rows)) - set(batch.rows))
    assert padding, "every case has padding rows"
    np.testing.assert_array_equal(out[padding], 0.0)
    # Exactly the appended slots changed (padding rows wrote nothing, layer 0 untouched).
    np.testing.assert_array_equal(new_pool, expected_pool)
