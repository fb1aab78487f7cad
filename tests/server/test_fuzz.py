"""Hostile input over the wire: hypothesis draws >= 300 requests, each must get the right status code.

Every drawn case is one valid request with random fields, or a valid request with exactly one field made
hostile (so the expected code and the field the message must name are known without asking the server):
empty prompts, prompts over the context, unknown token ids, NaN / negative temperature, top_p outside
(0, 1], top_k of -5, huge max_tokens, stop lists of 10,000 strings, bad request ids, invalid UTF-8 on the
wire, duplicated request ids, and Detokenize of unknown ids or of byte tokens that are not UTF-8 alone.
Afterwards the server still serves and every KV page is free.
"""

from __future__ import annotations

import dataclasses
import math
import uuid

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loong_jax.server.client import SERVICE_NAME, LoongClient
from loong_jax.server.generated import generation_pb2 as pb
from tests.server.harness import wait_pages_free

MIN_REQUESTS = 300
INVALID = grpc.StatusCode.INVALID_ARGUMENT
OK = grpc.StatusCode.OK


@dataclasses.dataclass(frozen=True)
class Case:
    kind: str  # "generate", "raw", "detokenize", "duplicate"
    request: object
    expected: grpc.StatusCode
    names: str = ""  # what the error message must mention


@pytest.fixture(scope="module")
def client(server):
    with LoongClient(server.target) as client:
        yield client


# Sampling profiles: the values inside a profile are drawn freely (they are runtime arrays of the
# sampler); the profile fixes which sampler program runs (greedy / sampled / logprobs), so the test
# compiles a few programs instead of one per random combination. Penalties and min_tokens, which add
# history widths to the program, are covered by test_generation.
PROFILES = {
    "greedy": {},
    "sampled": {"temperature": st.floats(0.05, 2.0), "top_p": st.floats(0.05, 1.0), "top_k": st.integers(-1, 50),
                "min_p": st.floats(0.0, 0.2), "seed": st.integers(0, 2**64 - 1)},
    "logprobs": {"logprobs": st.integers(0, 5)},
}


def _valid_sampling(draw) -> pb.SamplingParams:
    sampling = pb.SamplingParams(max_tokens=draw(st.integers(1, 3)), temperature=0.0)
    for field, strategy in PROFILES[draw(st.sampled_from(sorted(PROFILES)))].items():
        setattr(sampling, field, draw(strategy))
    optional = {"ignore_eos": st.booleans(), "n": st.integers(1, 2), "skip_special_tokens": st.booleans(),
                "min_tokens": st.just(0)}
    for field, strategy in optional.items():
        if draw(st.booleans()):
            setattr(sampling, field, draw(strategy))
    sampling.stop.extend(draw(st.lists(st.text(min_size=1, max_size=8), max_size=3)))
    return sampling


def _valid_request(draw, vocab_size: int) -> pb.GenerateRequest:
    request = pb.GenerateRequest(sampling=_valid_sampling(draw))
    request.sampling.stop_token_ids.extend(draw(st.lists(st.integers(0, vocab_size - 1), max_size=2)))
    arm = draw(st.sampled_from(["text", "token_ids", "messages"]))
    # Short prompts: the prefill programs of one or two shape buckets serve them all.
    if arm == "text":
        request.text = draw(st.text(min_size=1, max_size=8))
    elif arm == "token_ids":
        request.token_ids.ids.extend(draw(st.lists(st.integers(0, vocab_size - 1), min_size=1, max_size=12)))
    else:
        messages = draw(st.lists(st.tuples(st.sampled_from(["system", "user", "assistant"]),
                                           st.text(max_size=6)), min_size=1, max_size=2))
        request.messages.messages.extend(pb.ChatMessage(role=r, content=c) for r, c in messages)
    if draw(st.booleans()):
        request.request_id = draw(st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1,
                                          max_size=128))
    return request


def _hostile(draw, request: pb.GenerateRequest, vocab_size: int, context: int) -> Case:
    """One field of a valid request made hostile; returns the expected code and the field named."""
    sampling = request.sampling
    mutation = draw(st.sampled_from([
        "empty_text", "empty_ids", "no_prompt", "empty_messages", "over_context", "unknown_id", "temperature",
        "top_p", "top_k", "min_p", "max_tokens_small", "max_tokens_huge", "min_tokens", "repetition_penalty",
        "penalty", "stop_many", "stop_bad", "stop_token_ids", "logprobs", "n", "request_id", "bad_utf8"]))
    if mutation == "empty_text":
        request.text = ""
        return Case("generate", request, INVALID, "text")
    if mutation == "empty_ids":
        request.token_ids.CopyFrom(pb.TokenIds())
        return Case("generate", request, INVALID, "token_ids")
    if mutation == "no_prompt":
        request.ClearField("prompt")  # clears whichever arm is set
        for arm in ("text", "token_ids", "messages"):
            request.ClearField(arm)
        return Case("generate", request, INVALID, "prompt")
    if mutation == "empty_messages":
        request.messages.CopyFrom(pb.ChatMessages())
        return Case("generate", request, INVALID, "messages")
    if mutation == "over_context":
        length = draw(st.integers(context, context + 40))
        request.token_ids.CopyFrom(pb.TokenIds(ids=[draw(st.integers(0, vocab_size - 1))] * length))
        return Case("generate", request, INVALID, "max_prompt_tokens")
    if mutation == "unknown_id":
        ids = draw(st.lists(st.integers(0, vocab_size - 1), min_size=1, max_size=10))
        position = draw(st.integers(0, len(ids)))
        ids.insert(position, draw(st.one_of(st.integers(vocab_size, 2**31 - 1), st.integers(-(2**31), -1))))
        request.token_ids.CopyFrom(pb.TokenIds(ids=ids))
        return Case("generate", request, INVALID, f"token_ids.ids[{position}]")
    if mutation == "temperature":
        sampling.temperature = draw(st.sampled_from([math.nan, -math.inf, math.inf, -1.0, -1e-9, 100.5, 1e308]))
        return Case("generate", request, INVALID, "temperature")
    if mutation == "top_p":
        sampling.top_p = draw(st.sampled_from([0.0, -0.5, 1.0000001, 7.0, math.nan]))
        return Case("generate", request, INVALID, "top_p")
    if mutation == "top_k":
        sampling.top_k = draw(st.integers(-(2**31), -2))
        return Case("generate", request, INVALID, "top_k")
    if mutation == "min_p":
        sampling.min_p = draw(st.sampled_from([-0.1, 1.5, math.nan]))
        return Case("generate", request, INVALID, "min_p")
    if mutation == "max_tokens_small":
        sampling.max_tokens = draw(st.integers(-(2**63), 0))
        sampling.min_tokens = 0
        return Case("generate", request, INVALID, "max_tokens")
    if mutation == "max_tokens_huge":
        sampling.max_tokens = draw(st.integers(context, 2**63 - 1))
        sampling.min_tokens = 0
        return Case("generate", request, INVALID, "max_tokens")
    if mutation == "min_tokens":
        sampling.min_tokens = draw(st.one_of(st.integers(sampling.max_tokens + 1, 2**40), st.integers(-(2**40), -1)))
        return Case("generate", request, INVALID, "min_tokens")
    if mutation == "repetition_penalty":
        sampling.repetition_penalty = draw(st.sampled_from([0.0, -1.0, 10.5, math.inf]))
        return Case("generate", request, INVALID, "repetition_penalty")
    if mutation == "penalty":
        field = draw(st.sampled_from(["presence_penalty", "frequency_penalty"]))
        setattr(sampling, field, draw(st.sampled_from([2.5, -2.5, math.nan, 1e300])))
        return Case("generate", request, INVALID, field)
    if mutation == "stop_many":
        sampling.ClearField("stop")
        sampling.stop.extend(["stop"] * draw(st.sampled_from([65, 1000, 10_000])))
        return Case("generate", request, INVALID, "stop")
    if mutation == "stop_bad":
        sampling.ClearField("stop")
        sampling.stop.extend(["ok", draw(st.sampled_from(["", "x" * 257]))])
        return Case("generate", request, INVALID, "stop[1]")
    if mutation == "stop_token_ids":
        sampling.ClearField("stop_token_ids")
        bad = draw(st.one_of(st.integers(-(2**63), -1), st.integers(vocab_size, 2**31 - 1)))
        sampling.stop_token_ids.extend([0, bad])
        return Case("generate", request, INVALID, "stop_token_ids[1]")
    if mutation == "logprobs":
        sampling.logprobs = draw(st.one_of(st.integers(-(2**31), -1), st.integers(21, 2**31 - 1)))
        return Case("generate", request, INVALID, "logprobs")
    if mutation == "n":
        sampling.n = draw(st.one_of(st.integers(-(2**31), 0), st.integers(17, 2**31 - 1)))
        return Case("generate", request, INVALID, "n")
    if mutation == "request_id":
        request.request_id = draw(st.sampled_from(["", "x" * 129, "tab\there", "new\nline", "é-not-ascii"]))
        return Case("generate", request, INVALID, "request_id")
    body = bytearray(pb.GenerateRequest(text="ab", sampling=sampling).SerializeToString())
    body[2:4] = draw(st.sampled_from([b"\xff\xfe", b"\xc3\x28", b"\xed\xa0"]))  # text bytes: not UTF-8
    return Case("raw", bytes(body), INVALID, "GenerateRequest")


@st.composite
def cases(draw, vocab_size: int, context: int) -> Case:
    kind = draw(st.sampled_from(["valid"] * 3 + ["hostile"] * 6 + ["detokenize", "duplicate"]))
    if kind == "detokenize":
        ids = draw(st.lists(st.integers(0, vocab_size - 1), max_size=12))
        if draw(st.booleans()):
            return Case("detokenize", ids, OK)
        position = draw(st.integers(0, len(ids)))
        ids.insert(position, draw(st.one_of(st.integers(vocab_size, 2**31 - 1), st.integers(-(2**31), -1))))
        return Case("detokenize", ids, INVALID, f"token_ids[{position}]")
    request = _valid_request(draw, vocab_size)
    if kind == "valid":
        return Case("generate", request, OK)
    if kind == "duplicate":
        return Case("duplicate", request, grpc.StatusCode.ALREADY_EXISTS, "request_id")
    return _hostile(draw, request, vocab_size, context)


def _generate(client: LoongClient, request: pb.GenerateRequest) -> list[pb.GenerateResponse]:
    return list(client.stub.Generate(request, timeout=60))


def _run_case(client: LoongClient, case: Case, engine_port) -> None:
    tokenizer = engine_port.tokenizer
    try:
        if case.kind == "generate":
            messages = _generate(client, case.request)
            finished = messages[-1].finished
            sampling = case.request.sampling
            n = sampling.n if sampling.HasField("n") else 1
            assert finished.finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)
            assert len(finished.samples) == n
            assert finished.usage.completion_tokens <= n * sampling.max_tokens
            for message in messages[1:-1]:
                assert message.delta.text.encode("utf-8").decode("utf-8") == message.delta.text
        elif case.kind == "raw":
            raw = client.channel.unary_stream("/loong_jax.v1.Generation/Generate",
                                              request_serializer=bytes, response_deserializer=bytes)
            list(raw(case.request, timeout=60))
        elif case.kind == "detokenize":
            text = client.detokenize(case.request, timeout=60)
            assert text == tokenizer.decode(case.request)
        else:  # duplicate: the same id while the first request still runs
            # a fresh id per call: hypothesis replays equal cases back to back, and reusing an id right after
            # its stream was cancelled is not what this case tests (a duplicate while the first still runs)
            request_id = f"duplicate-{uuid.uuid4().hex}"
            case.request.request_id = request_id
            first = client.generate([5, 6, 7], request_id=request_id, max_tokens=200, ignore_eos=True)
            iterator = iter(first)
            next(iterator)
            try:
                _generate(client, case.request)
            finally:
                first.cancel()
        code, details = OK, ""
    except grpc.RpcError as error:
        code, details = error.code(), error.details() or ""
    assert code == case.expected, (case.kind, case.names, details)
    assert case.names in details


def test_hostile_requests_get_the_right_codes(client, engine_port):
    counted = []
    strategy = cases(engine_port.vocab_size, engine_port.context_length)

    @settings(max_examples=MIN_REQUESTS + 20, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def check(case: Case):
        counted.append(case.expected)
        _run_case(client, case, engine_port)

    check()
    assert len(counted) >= MIN_REQUESTS
    assert counted.count(OK) >= 30 and counted.count(INVALID) >= 150  # both sides really exercised
    assert client.health() == "SERVING" and client.health(SERVICE_NAME) == "SERVING"
    assert client.complete("Return the number of", max_tokens=2, temperature=0).finish_reason == "length"
    wait_pages_free(engine_port)
