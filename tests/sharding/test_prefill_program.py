"""Whole-model ring prefill on d instances against the dense single-device
model: last-token logits, and the KV each pool keeps (slot by slot)."""

import collections
import re
import warnings

import jax
import numpy as np
import pytest
from flax import nnx

from loong_jax.models.config import ModelConfig
from loong_jax.models.llama import init_model
from loong_jax.sharding.kv_pool import PoolShape, assemble_group_pool, create_pool, split_group_pool
from loong_jax.executor.programs import prefill_program
from loong_jax.sharding.prefill_program import make_prefill_inputs
from loong_jax.sharding.stripe_layout import keep_round_robin, place_densely, striped_layout
from loong_jax.sharding.topology import Topology, group_params, place_params
from tests.models.attention_reference import empty_kv_record, recording_dense_attention

GQA = ModelConfig(model_type="llama", vocab_size=96, hidden_size=64, intermediate_size=128,
                  num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=500.0)
QKV_BIAS = ModelConfig(model_type="qwen2", vocab_size=80, hidden_size=64, intermediate_size=96,
                       num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, qkv_bias=True,
                       tie_word_embeddings=True)
PAGES, PAGE_SIZE, SENTINEL = 12, 4, 3.5
COLLECTIVE = re.compile(r"= (\S+) (all-gather|all-reduce|collective-permute|all-to-all|reduce-scatter|"
                        r"collective-broadcast)(?:-start)?\(")


def collectives(hlo: str) -> collections.Counter:
    """(op, result shape) -> count, over the compiled program."""
    return collections.Counter((op, shape.split("{")[0]) for shape, op in COLLECTIVE.findall(hlo))


REFERENCE_TOKENS = 64  # the reference stream is padded to one length: one compile per model


def dense_reference(reference_fn, lengths, stream_tokens):
    """Single-device forward over the packed stream: last-token logits and
    every layer's k, v ([layers, 2, total, kv_heads, head_dim])."""
    total = int(np.sum(lengths))
    pad = REFERENCE_TOKENS - total
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    positions = np.concatenate([np.arange(n) for n in lengths] + [np.zeros(pad)]).astype(np.int32)
    segments = np.concatenate([np.repeat(np.arange(len(lengths)), lengths), np.full(pad, -1)]).astype(np.int32)
    tokens = np.concatenate([stream_tokens, np.zeros(pad, np.int32)])
    logits, kept = reference_fn(tokens, positions, segments, (offsets[1:] - 1).astype(np.int32))
    return np.asarray(logits), np.asarray(kept)[:, :, :total]


def make_reference_fn(graphdef, state):
    """The dense model, jitted, recording each layer's k, v."""

    @jax.jit
    def forward(tokens, positions, segments, logits_indices):
        model = nnx.merge(graphdef, state)
        return model(tokens, positions, segments, attention=recording_dense_attention,
                     kv_cache=empty_kv_record(model.config, tokens.shape[0]),
                     logits_indices=logits_indices)  # logits, kept [layers, 2, tokens, kv_heads, head_dim]

    return forward


@pytest.fixture(scope="module")
def setups():
    """Per (config, tp): the topology, the model split, its placed weights and
    a compiled program per group (compiled once, reused by later cases)."""
    cache, references = {}, {}

    def get(config, tp):
        if (config, tp) not in cache:
            graphdef, state = nnx.split(init_model(config, seed=3))
            if config not in references:  # the reference does not depend on tp
                references[config] = make_reference_fn(graphdef, state)
            topology = Topology(jax.devices(), tp)
            cache[(config, tp)] = dict(reference=references[config], graphdef=graphdef, topology=topology,
                                       placed=place_params(state, topology), programs={})
        return cache[(config, tp)]

    return get


def run_prefill(setup, config, group, lengths, keepers, seed):
    topology, graphdef = setup["topology"], setup["graphdef"]
    mesh = topology.group_mesh(group)
    if group not in setup["programs"]:
        setup["programs"][group] = prefill_program(graphdef, mesh)
    program = setup["programs"][group]
    d = len(group)
    rng = np.random.default_rng(seed)
    stream_tokens = rng.integers(0, config.vocab_size, int(np.sum(lengths))).astype(np.int32)
    layout = striped_layout(lengths, d)
    keep_member = keep_round_robin(lengths, keepers)
    segments = np.repeat(np.arange(len(lengths)), lengths)
    tables = []
    for member in range(d):  # page tables from a shuffled free list per member
        free = list(rng.permutation(PAGES))
        tables.append([[int(free.pop()) for _ in range(
            -(-int(np.sum((keep_member == member) & (segments == r))) // PAGE_SIZE))]
            for r in range(len(lengths))])
    placement = place_densely(lengths, keep_member, tables, PAGE_SIZE)
    batch = make_prefill_inputs(layout, stream_tokens, placement, mesh)
    shape = PoolShape.for_model(config, PAGES, PAGE_SIZE)
    pool = assemble_group_pool([create_pool(shape, topology, i, fill=SENTINEL) for i in group], mesh)
    params = group_params(setup["placed"], topology, group)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a "donated buffers were not usable" warning fails the test
        logits, pool_out = program(params, pool, batch)
    assert pool.is_deleted()

    ref_logits, ref_kv = dense_reference(setup["reference"], lengths, stream_tokens)
    scale = np.abs(ref_logits).max()
    assert np.abs(np.asarray(logits) - ref_logits).max() <= 1e-4 * scale
    # Each pool holds exactly its placed tokens' k, v; every other slot keeps the sentinel.
    for member, member_pool in enumerate(split_group_pool(pool_out, topology, group)):
        host = np.asarray(member_pool)[0].reshape(config.num_layers, 2, PAGES * PAGE_SIZE,
                                                  config.num_kv_heads, config.head_dim)
        mine = placement.member == member
        written = np.zeros(PAGES * PAGE_SIZE, bool)
        written[placement.slot[mine]] = True
        assert (host[:, :, ~written] == SENTINEL).all()
        np.testing.assert_allclose(host[:, :, placement.slot[mine]], ref_kv[:, :, mine],
                                   rtol=1e-5, atol=1e-5 * np.abs(ref_kv).max())
    return program, params, batch, pool_out


CASES = [(1, 1), (2, 1), (3, 1), (4, 1), (8, 1), (1, 2), (2, 2), (3, 2), (4, 2)]  # (d, tp)


@pytest.mark.parametrize("d,tp", CASES)
def test_ring_prefill_logits_and_kv_match_dense_model(setups, d, tp):
    setup = setups(GQA, tp)
    group = tuple(range(setup["topology"].num_instances))[-d:][::-1]  # e.g. (3, 2, 1) for d=3, tp=2
    lengths = [1, d + 2, 3 * d + 1, 4]
    keepers = [[0], list(range(d)), [d - 1], [0, d - 1] if d > 1 else [0]]
    program, params, batch, pool = run_prefill(setup, GQA, group, lengths, keepers, seed=d + 10 * tp)
    # The ring's permutes carry all KV traffic. Besides them only the tensor
    # parallel sums (o_proj and down_proj of each layer, inside an instance)
    # and one sum that brings the scored rows' hidden states together.
    found = collectives(program.lower(params, pool, batch).compile().as_text())
    permutes = sum(n for (op, _), n in found.items() if op == "collective-permute")
    assert (permutes > 0) == (d > 1)  # XLA may fuse the k, v and metadata moves
    rows_local = batch.tokens.shape[0] // d
    expected_sums = collections.Counter()
    if d > 1:
        expected_sums[("all-reduce", f"f32[{len(lengths)},{GQA.hidden_size}]")] += 1
    if tp > 1:
        # The layer scan's body holds one layer's code: its two sums appear once, whatever the depth.
        layer_copies = 1 if GQA.scan_layers else GQA.num_layers
        expected_sums[("all-reduce", f"f32[{rows_local},{GQA.hidden_size}]")] += 2 * layer_copies
    assert {k: n for k, n in found.items() if k[0] != "collective-permute"} == dict(expected_sums)


@pytest.mark.parametrize("d,tp", [(3, 2), (8, 1)])
def test_qkv_bias_tied_embeddings_model(setups, d, tp):
    setup = setups(QKV_BIAS, tp)
    group = tuple(range(d))
    run_prefill(setup, QKV_BIAS, group, [2, 5 * d - 1, 1], [[d - 1], [0], list(range(d))], seed=5)


def test_program_is_reused_for_the_same_bucket(setups):
    setup = setups(GQA, 1)
    group = (5, 6)
    program, *_ = run_prefill(setup, GQA, group, [3, 4], [[0], [1]], seed=1)
    size = program._cache_size()
    run_prefill(setup, GQA, group, [2, 5], [[1], [0, 1]], seed=2)  # same rows (4) and prompt count
    assert program._cache_size() == size
