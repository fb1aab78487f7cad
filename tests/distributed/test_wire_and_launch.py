"""What a multi-process step travels as, and the launch options, without starting any process:
a plan and its step inputs survive `wire.StepEncoder` / `StepDecoder` exactly over consecutive steps
(request ids, instances and migration units keep their types and identity; after its first step a request
travels as what changed, so a long context costs no more bytes per step than a short one); unseeded sampling rows get one seed per step (so every
process samples alike) and greedy or seeded rows are left alone; the follower's unit outputs come back as
the same int32 matrices; bad launch values are refused with the option named, before anything loads."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from loong_jax.distributed.channel import _requests_of
from loong_jax.distributed.launch import ClusterOptions, cluster_options, from_env
from loong_jax.distributed.wire import FORGET_AFTER_STEPS, StepDecoder, StepEncoder, decode_outputs, \
    encode_outputs, encode_stop, seed_unseeded
from loong_jax.executor.protocol import MigrationTicket, RequestInputs, StepInputs
from loong_jax.sampling.batch import SamplingRow
from loong_jax.sampling.params import SamplingParams
from loong_jax.scheduler.plan import DecodeBatch, Migration, Plan, PrefillBatch


def a_step() -> tuple[Plan, StepInputs]:
    plan = Plan(prefills=(PrefillBatch((4, 5, 6, 7), (3,), ((0, 6),), (((4, 2), (5, 4)),), estimated_s=0.125),),
                decodes=(DecodeBatch((0, 1), (1, 2), (0, 1), estimated_s=0.01),),
                migrations=(Migration(2, 1, 5, 7),))
    greedy = SamplingParams(temperature=0.0, max_tokens=9, stop=("x",), stop_token_ids=(1, 2))
    sampled = SamplingParams(temperature=0.7, top_p=0.9, max_tokens=4)
    seeded = SamplingParams(temperature=0.7, seed=2**63 + 5)
    requests = {
        1: RequestInputs(SamplingRow(greedy, (5, 6, 7), (8,), 0), {0: (3, 4)}, {0: 4}),
        2: RequestInputs(SamplingRow(sampled, (9,) * 5, (10, 11), 1), {1: (0,), 0: (7,)}, {1: 3, 0: 4}),
        3: RequestInputs(SamplingRow(seeded, tuple(range(4, 10)), (), 0), {4: (0,), 5: (1, 2)}, {4: 2, 5: 4}),
    }
    (batch,) = plan.migration_batches()
    tickets = (MigrationTicket(0, 2, 1, 5, 7, (2, 3), 9, (0, 1, 2, 3)),)
    return plan, StepInputs(requests, {batch: tickets})


def grown(inputs: StepInputs, new_token: int) -> StepInputs:
    """The next decode step of every request: one more output token, one more page on its first instance."""
    requests = {}
    for request_id, request in inputs.requests.items():
        sampling = dataclasses.replace(request.sampling,
                                       output_token_ids=tuple(request.sampling.output_token_ids) + (new_token,))
        first, *_ = request.page_tables
        tables = {**request.page_tables, first: tuple(request.page_tables[first]) + (50 + new_token,)}
        requests[request_id] = RequestInputs(sampling, tables, {**request.kv_tokens, first: request.kv_tokens[first] + 1})
    return StepInputs(requests, {})


def test_consecutive_steps_round_trip_exactly_and_send_only_what_changed():
    plan, inputs = a_step()
    encoder, decoder = StepEncoder(), StepDecoder()
    first = encoder.encode(0, plan, inputs)
    step, decoded_plan, decoded = decoder.decode(first)
    assert (step, decoded_plan) == (0, plan)
    assert decoded.requests == inputs.requests  # ids, page tables (instance -> pages) and tokens, typed
    assert decoded.migrations == inputs.migrations  # keyed by the same MigrationBatch as the leader's
    sizes = []
    for step in range(1, 4):
        inputs = grown(inputs, step)
        inputs = dataclasses.replace(inputs, requests={**inputs.requests, 2: dataclasses.replace(
            inputs.requests[2], page_tables={0: (9, 8)}, kv_tokens={0: 8})})  # moved whole: a new table
        payload = encoder.encode(step, Plan(), inputs)
        sizes.append(len(payload))
        assert decoder.decode(payload)[2].requests == inputs.requests
    assert max(sizes) < len(first) / 2  # the prompts and parameters travelled once
    assert decoder.decode(encode_stop()) is None


def test_both_ends_forget_idle_requests_alike_and_resend_them_whole():
    plan, inputs = a_step()
    encoder, decoder = StepEncoder(), StepDecoder()
    decoder.decode(encoder.encode(0, plan, inputs))
    quiet = 2 * FORGET_AFTER_STEPS
    decoder.decode(encoder.encode(quiet, Plan(), StepInputs()))
    assert encoder.known == {} and decoder.known == {}
    assert decoder.decode(encoder.encode(quiet + 1, plan, inputs))[2].requests == inputs.requests


def test_only_unseeded_sampling_rows_get_this_steps_seed():
    _, inputs = a_step()
    seeded = seed_unseeded(inputs)
    assert seeded.requests[1] == inputs.requests[1]  # greedy: no randomness to agree on
    assert seeded.requests[3] == inputs.requests[3]  # the caller's seed is kept
    params = seeded.requests[2].sampling.params
    assert params.seed is not None and dataclasses.replace(params, seed=None) == inputs.requests[2].sampling.params
    assert seed_unseeded(inputs).requests[2].sampling.params.seed != params.seed  # fresh at every step


def test_the_leader_sends_only_the_requests_its_units_run():
    plan, inputs = a_step()
    extra = dict(inputs.requests)
    extra[99] = inputs.requests[1]
    assert _requests_of(plan, dataclasses.replace(inputs, requests=extra)).requests == inputs.requests


def test_unit_outputs_round_trip():
    packed = np.arange(12, dtype=np.int32).reshape(3, 4) - 5
    decoded = decode_outputs(encode_outputs([packed, None]))
    assert decoded[1] is None and decoded[0].dtype == np.int32 and np.array_equal(decoded[0], packed)


@pytest.mark.parametrize("values,message", [
    (("localhost", 2, 0), "HOST:PORT"),
    (("localhost:99999", 2, 0), "HOST:PORT"),
    (("10.0.0.1:8476", 0, 0), "num_processes"),
    (("10.0.0.1:8476", 2, 2), r"process_id must be an integer in \[0, 1\]"),
    (("10.0.0.1:8476", 2, -1), "process_id"),
])
def test_bad_launch_values_are_refused_naming_the_option(values, message):
    with pytest.raises(ValueError, match=message):
        ClusterOptions(*values)


def test_launch_values_come_all_together_or_not_at_all():
    assert cluster_options(None, None, None) is None
    assert cluster_options("h:1", 2, 1) == ClusterOptions("h:1", 2, 1)
    with pytest.raises(ValueError, match="missing: num_processes, process_id"):
        cluster_options("h:1", None, None)


def test_launch_values_from_the_environment():
    assert from_env({}) == {}
    assert from_env({"LOONG_JAX_COORDINATOR": "h:1", "LOONG_JAX_NUM_PROCESSES": "4",
                     "LOONG_JAX_PROCESS_ID": "3"}) == {"coordinator": "h:1", "num_processes": 4, "process_id": 3}
    with pytest.raises(ValueError, match="LOONG_JAX_PROCESS_ID must be an integer"):
        from_env({"LOONG_JAX_PROCESS_ID": "first"})


def test_engine_config_and_llm_check_the_launch_before_loading():
    from loong_jax.entrypoints.engine_config import EngineConfig
    from loong_jax.entrypoints.llm import LLM

    with pytest.raises(ValueError, match="missing: process_id"):
        EngineConfig(coordinator="h:1", num_processes=2)
    config = EngineConfig("/no/such/checkpoint", coordinator="h:1", num_processes=2, process_id=1)
    assert config.cluster == ClusterOptions("h:1", 2, 1)
    with pytest.raises(ValueError, match="process_id 1 is a follower"):  # before the missing folder is read
        LLM(engine_config=config)
