"""`executor.programs`: one definition per program kind. The program the engine compiles for a key donates the
pool for every kind; the same definition returns logits (signature None, what the sharding tests compare)
or the fused greedy sampler's tokens, and they agree; a sampling signature is a named, hashable tuple that a
plain tuple key still finds."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from loong_jax.executor.program_cache import ProgramKey
from loong_jax.executor.programs import ProgramContext, abstract_inputs, lower, prefill_program
from loong_jax.models.config import ModelConfig
from loong_jax.models.llama import init_model
from loong_jax.sampling.batch import PLAIN_GREEDY, SamplingRow, SamplingSignature, greedy_batch
from loong_jax.sampling.params import SamplingParams
from loong_jax.sharding.kv_pool import PoolShape, assemble_group_pool, create_pool
from loong_jax.sharding.prefill_program import make_prefill_inputs
from loong_jax.sharding.stripe_layout import Placement, striped_layout
from loong_jax.sharding.topology import Topology, group_params, place_params

CONFIG = ModelConfig(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                     num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16)
PAGES, PAGE_SIZE = 8, 4
SAMPLING = SamplingSignature(8, 16, 16, 5, False)


@pytest.fixture(scope="module")
def context():
    graphdef, state = nnx.split(init_model(CONFIG, seed=1))
    topology = Topology(jax.devices()[:4], tp=1)
    return ProgramContext(graphdef, topology, place_params(state, topology),
                          PoolShape.for_model(CONFIG, PAGES, PAGE_SIZE), "reference")


@pytest.mark.parametrize("key", [
    ProgramKey("prefill", (0, 1), (16, 8, PLAIN_GREEDY)),
    ProgramKey("prefill_context", (2, 3), (16, 8, 8, SAMPLING)),
    ProgramKey("decode", (1,), (8, 64, tuple(PLAIN_GREEDY))),  # a plain tuple, as a hand-made key holds it
    ProgramKey("migrate", (0, 3), (64,)),
])
def test_every_engine_program_donates_its_pool(context, key):
    arguments = abstract_inputs(context, key)
    pool_index = 0 if key.kind == "migrate" else 1
    assert arguments[pool_index].shape == context.pool_shape.group_shape(len(key.group))
    lowered = lower(context, key)
    donated = [leaf for leaf in jax.tree.leaves(lowered.args_info) if leaf.donated]
    assert len(donated) == 1 and donated[0].shape == arguments[pool_index].shape


def test_unknown_kind_is_refused(context):
    with pytest.raises(ValueError, match="unknown program kind"):
        lower(context, ProgramKey("prefil", (0,), (16, 8, PLAIN_GREEDY)))


def test_logits_and_sampled_tokens_come_from_one_definition(context):
    group, lengths = (0, 1), [5, 9]
    mesh = context.topology.group_mesh(group)
    params = group_params(context.placed_params, context.topology, group)
    total = sum(lengths)
    inputs = make_prefill_inputs(striped_layout(lengths, len(group)), np.arange(total) % CONFIG.vocab_size,
                                 Placement(member=np.zeros(total, np.int32), slot=np.arange(total, dtype=np.int32)),
                                 mesh)

    def fresh_pool():
        return assemble_group_pool([create_pool(context.pool_shape, context.topology, i) for i in group], mesh)

    logits, _ = prefill_program(context.graphdef, mesh, "reference")(params, fresh_pool(), inputs)
    rows = [SamplingRow(SamplingParams(temperature=0.0, max_tokens=1), (), ())] * len(lengths)
    sampling = greedy_batch(rows, CONFIG.vocab_size, ())
    tokens, _ = prefill_program(context.graphdef, mesh, "reference", PLAIN_GREEDY)(
        params, fresh_pool(), inputs, sampling)
    assert np.asarray(logits).shape == (len(lengths), CONFIG.vocab_size)
    assert np.asarray(tokens)[:, 0].tolist() == np.asarray(logits).argmax(axis=-1).tolist()


def test_sampling_signature_is_a_named_key_part():
    assert PLAIN_GREEDY.plain_greedy and PLAIN_GREEDY.logprobs_columns is None and PLAIN_GREEDY.stop_ids == 8
    plain = ProgramKey("decode", (0,), (8, 64, (8, 1, 1, None, True, (False,) * 4)))  # greedy: no sampler stage
    named = ProgramKey("decode", (0,), (8, 64, PLAIN_GREEDY))
    assert plain == named and hash(plain) == hash(named) and {plain: 1}[named] == 1
    assert named.describe() == "decode d=1 (0) batch<=8 pages<=64 greedy"
    assert ProgramKey("prefill_context", (2, 3), (32, 4, 64, SAMPLING)).describe() == \
        "prefill_context d=2 (2,3) rows<=32 requests<=4 pages<=64 sampling logprobs<=5"
