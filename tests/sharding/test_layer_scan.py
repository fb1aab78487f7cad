"""The layer scan (`ModelConfig.scan_layers`) in the engine's prefill, context prefill and decode programs:
one layer's code whatever the depth, the donated pool updated in place (no pool-sized copy, no layer of the
pool sliced out per layer), and the same logits and pool contents as the unrolled loop on the same weights."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable

import jax
import numpy as np
import pytest
from flax import nnx

from loong_jax.executor.programs import context_prefill_program, decode_program, prefill_program
from loong_jax.models.config import ModelConfig
from loong_jax.models.llama import init_model
from loong_jax.sharding.context_prefill import chunk_layout, layout_context
from loong_jax.sharding.decode_program import DecodeRow, layout_decode_batch
from loong_jax.sharding.kv_pool import PoolShape, assemble_group_pool, create_pool
from loong_jax.sharding.prefill_program import make_prefill_inputs
from loong_jax.sharding.stripe_layout import Placement, striped_layout
from loong_jax.sharding.topology import Topology, group_params, place_params

CONFIG = ModelConfig(model_type="llama", vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=3,
                     num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=256)
# Enough pages that one layer's keys outsize every weight matrix: any array that large is the pool's.
PAGES, PAGE_SIZE = 256, 4
GROUP = (0, 1)  # d = 2, tp = 1: the hooks' collectives run inside the scan
PROMPT_LENGTHS = (5, 7)
CHUNK_TOKENS = 3  # a chunk continuing prompt 0
DECODE_ROWS_LOCAL, DECODE_PAGES = 2, 8
# Ops that may produce pool-sized arrays without copying them: the scatters that append KV (in place on
# the donated buffer) and the loop's plumbing.
IN_PLACE_OPS = {"scatter", "while", "tuple", "parameter", "get-tuple-element", "bitcast"}


def programs_and_inputs(config: ModelConfig):
    """The engine's programs for `config` on GROUP (weights from seed 0) in the order a request meets them,
    each with its inputs after the pool: (name, jitted program, params, inputs), and a fresh pool.

    prefill: prompt r kept densely on member r; context prefill: 3 more tokens of prompt 0, attending to its
    5 held ones; decode: the next token of each prompt."""
    topology = Topology(jax.devices(), tp=1)
    mesh = topology.group_mesh(GROUP)
    graphdef, state = nnx.split(init_model(config, seed=0))
    params = group_params(place_params(state, topology), topology, GROUP)
    members, tokens = len(GROUP), np.random.default_rng(0).integers(0, config.vocab_size, 32).astype(np.int32)

    def fresh_pool():
        shape = PoolShape.for_model(config, PAGES, PAGE_SIZE)
        return assemble_group_pool([create_pool(shape, topology, i) for i in GROUP], mesh)

    placement = Placement(member=np.repeat(np.arange(members, dtype=np.int32), PROMPT_LENGTHS),
                          slot=np.concatenate([np.arange(n, dtype=np.int32) for n in PROMPT_LENGTHS]))
    prompts = make_prefill_inputs(striped_layout(PROMPT_LENGTHS, members=members),
                                  tokens[:sum(PROMPT_LENGTHS)], placement, mesh)
    held, more = PROMPT_LENGTHS[0], CHUNK_TOKENS
    chunk = make_prefill_inputs(chunk_layout([(held, more)], members), tokens[-more:],
                                Placement(member=np.zeros(more, np.int32),
                                          slot=np.arange(held, held + more, dtype=np.int32)), mesh)
    held_pages = list(range(-(-held // PAGE_SIZE)))
    context = layout_context([held], [{0: held_pages}], [{0: held}], members, max_pages=len(held_pages),
                             page_size=PAGE_SIZE).to_device(mesh)
    lengths = (held + more, *PROMPT_LENGTHS[1:])
    rows = [DecodeRow(token=3, position=n, master=r, append_slot=n, pages={r: list(range(n // PAGE_SIZE + 1))},
                      kv_lens={r: n + 1}) for r, n in enumerate(lengths)]
    step = layout_decode_batch(rows, members, DECODE_ROWS_LOCAL, DECODE_PAGES, PAGE_SIZE).to_device(mesh)
    programs = [("prefill", prefill_program(graphdef, mesh), params, (prompts,)),
                ("context prefill", context_prefill_program(graphdef, mesh), params, (chunk, context)),
                ("decode", decode_program(graphdef, mesh), params, (step,))]
    return programs, fresh_pool


def compiled_programs(config: ModelConfig) -> tuple[list, Callable]:
    """`programs_and_inputs` with each program compiled ahead of time (its HLO text at hand)."""
    programs, fresh_pool = programs_and_inputs(config)
    return [(name, program.lower(params, fresh_pool(), *inputs).compile(), params, inputs)
            for name, program, params, inputs in programs], fresh_pool


def pool_sized_ops(hlo_text: str, min_elements: int) -> set[str]:
    """Opcodes of the compiled module's instructions whose result has at least `min_elements` elements
    (a fusion counts as the ops inside it: a fused scatter reads as a scatter)."""
    found = set()
    for line in hlo_text.splitlines():
        match = re.match(r"\s*(?:ROOT )?%(\S+) = \w+\[([\d,]+)\]\{[^}]*\} ([\w-]+)\(", line)
        if match and math.prod(int(n) for n in match.group(2).split(",")) >= min_elements:
            name, opcode = match.group(1), match.group(3)
            found.add("scatter" if opcode == "fusion" and "scatter" in name else opcode)
    return found


@pytest.fixture(scope="module")
def scanned():
    return compiled_programs(CONFIG)


def test_scanned_programs_update_the_donated_pool_in_place(scanned):
    layer_keys = PAGES * PAGE_SIZE * CONFIG.num_kv_heads * CONFIG.head_dim  # one layer's keys, one member
    programs, _ = scanned
    for name, program, _, _ in programs:
        text = program.as_text()
        assert " while(" in text, name  # the layer loop
        assert re.search(r"input_output_alias=\{ \{1\}: \(\d+, \{\}, may-alias\)", text), name  # pool out = in
        # No copy of the pool and no layer of it sliced out: only in-place scatters touch arrays that large.
        assert pool_sized_ops(text, layer_keys) <= IN_PLACE_OPS, (name, pool_sized_ops(text, layer_keys))


def test_program_size_does_not_grow_with_depth():
    def dots(num_layers: int) -> list[int]:
        programs, fresh_pool = programs_and_inputs(dataclasses.replace(CONFIG, num_layers=num_layers))
        return [program.lower(params, fresh_pool(), *inputs).as_text().count("stablehlo.dot_general")
                for _, program, params, inputs in programs]

    assert dots(2) == dots(5)


def test_scan_and_unrolled_loop_agree(scanned):
    """Prefill, context prefill, decode in turn on one pool: the same logits and pool either way."""
    results = []
    for programs, fresh_pool in (scanned, compiled_programs(CONFIG.with_scan_layers(False))):
        pool, outputs = fresh_pool(), []
        for _, program, params, inputs in programs:
            logits, pool = program(params, pool, *inputs)
            outputs.append(np.asarray(logits))
        results.append(outputs + [np.asarray(pool)])
    for scanned_result, unrolled_result in zip(*results):
        np.testing.assert_allclose(scanned_result, unrolled_result, rtol=0, atol=1e-5)
