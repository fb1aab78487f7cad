"""End-to-end over a real server on loopback: streamed answers, the unary calls, metrics and logs."""

from __future__ import annotations

import io
import json
import logging
import time
import urllib.request

import grpc
import pytest

from loong_jax.sampling.params import SamplingParams
from loong_jax.server.client import LoongClient
from loong_jax.server.generated import generation_pb2 as pb
from loong_jax.server.logging_setup import configure_logging
from tests.server.conftest import ENGINE_INSTANCES, ENGINE_KV_PAGES
from tests.server.harness import collect, wait_pages_free

PROMPTS = ["Return the number of", "This module provides functions", "A server answers requests"]


@pytest.fixture(scope="module")
def client(server):
    with LoongClient(server.target) as client:
        yield client


def _reference(reference_llm, prompt, **sampling):
    return reference_llm.generate([prompt], SamplingParams(**sampling), use_tqdm=False)[0]


@pytest.mark.parametrize("sampling", [
    dict(max_tokens=8, temperature=0.0),
    dict(max_tokens=6, temperature=0.9, top_p=0.9, top_k=20, seed=1234),
    dict(max_tokens=6, temperature=0.0, repetition_penalty=1.3, presence_penalty=0.5, min_tokens=2),
], ids=["greedy", "seeded", "penalties"])
def test_streamed_text_equals_llm_generate(client, reference_llm, sampling):
    for prompt in PROMPTS:
        stream = client.generate(prompt, **sampling)
        deltas = list(stream)
        completion = stream.completion
        expected = _reference(reference_llm, prompt, **sampling)
        assert completion.token_ids == expected.token_ids
        assert completion.text == expected.text == "".join(d.text for d in deltas)
        assert completion.finish_reason == expected.finish_reason
        assert completion.prompt_tokens == len(expected.prompt_token_ids)
        assert completion.usage.completion_tokens == len(expected.token_ids)
        assert completion.usage.total_tokens == completion.prompt_tokens + len(expected.token_ids)


def test_token_ids_and_chat_prompts_match_llm_generate(client, reference_llm):
    ids = client.tokenize("Create a new socket")
    completion = client.complete(ids, max_tokens=5, temperature=0)
    assert completion.token_ids == _reference(reference_llm, ids, max_tokens=5, temperature=0).token_ids
    chat = [{"role": "user", "content": "What does os.path.join do?"}]
    completion = client.complete(chat, max_tokens=5, temperature=0)
    expected = _reference(reference_llm, chat, max_tokens=5, temperature=0)
    assert completion.token_ids == expected.token_ids
    assert completion.prompt_tokens == len(expected.prompt_token_ids)


def test_stream_shape_logprobs_stop_and_n(client, reference_llm):
    call = client.stub.Generate(pb.GenerateRequest(
        text=PROMPTS[0], request_id="shape-1",
        sampling=pb.SamplingParams(max_tokens=4, temperature=0.0, logprobs=3, ignore_eos=True)))
    messages = list(call)
    assert [m.WhichOneof("event") for m in messages] == ["started"] + ["delta"] * 4 + ["finished"]
    assert all(m.request_id == "shape-1" for m in messages)
    assert messages[0].started.prompt_tokens == len(client.tokenize(PROMPTS[0]))
    for message in messages[1:-1]:
        (entry,) = message.delta.logprobs
        assert entry.token_id == message.delta.token_ids[0] and len(entry.top) == 3
        assert entry.rank >= 1 and entry.logprob <= 0.0
    finished = messages[-1].finished
    assert finished.finish_reason == pb.FINISH_REASON_LENGTH
    assert finished.timings.e2e_s >= finished.timings.time_to_first_token_s > 0.0
    # A stop string: the text is cut before it, exactly as LLM.generate cuts it.
    greedy = _reference(reference_llm, PROMPTS[1], max_tokens=12, temperature=0, ignore_eos=True)
    assert len(greedy.text) >= 6
    stop = greedy.text[3:6]
    completion = client.complete(PROMPTS[1], max_tokens=12, temperature=0, ignore_eos=True, stop=[stop])
    expected = _reference(reference_llm, PROMPTS[1], max_tokens=12, temperature=0, ignore_eos=True, stop=[stop])
    assert (completion.text, completion.finish_reason) == (expected.text, expected.finish_reason)
    assert completion.finish_reason == "stop" and stop not in completion.text
    assert completion.samples[0].stop_reason == expected.outputs[0].stop_reason == stop
    # n = 2 seeded samples, each equal to the reference's sample of the same index.
    completion = client.complete(PROMPTS[2], max_tokens=4, temperature=1.0, seed=7, n=2)
    expected = _reference(reference_llm, PROMPTS[2], max_tokens=4, temperature=1.0, seed=7, n=2)
    assert [s.token_ids for s in completion.samples] == [o.token_ids for o in expected.outputs]


def test_tokenize_detokenize_and_info(client, engine_port):
    tokenizer = engine_port.tokenizer
    text = "naïve café, 日本語"
    ids = client.tokenize(text)
    assert ids == tokenizer.encode(text)
    assert client.detokenize(ids) == tokenizer.decode(ids)
    assert client.tokenize(text, add_special_tokens=False) == tokenizer.encode(text, add_special_tokens=False)
    # A lone byte of a multi-byte character is not UTF-8: it comes back as U+FFFD, never broken.
    euro_bytes = tokenizer.encode("€", add_special_tokens=False)  # not in the corpus: one token per byte
    assert len(euro_bytes) == 3
    assert client.detokenize(euro_bytes[:1]) == tokenizer.decode(euro_bytes[:1]) and "€" not in tokenizer.decode(
        euro_bytes[:1])
    assert client.detokenize(euro_bytes) == "€"
    info = client.model_info()
    assert info.context_length == engine_port.context_length and info.vocab_size == engine_port.vocab_size
    assert list(info.special_tokens.eos_token_ids) == list(tokenizer.eos_token_ids)
    assert info.max_prompt_tokens == engine_port.context_length - 1 and info.num_layers > 0
    server_info = client.server_info()
    assert server_info.num_instances == len(server_info.instances) == ENGINE_INSTANCES
    assert all(i.kv_pages_total == i.kv_pages_free + i.kv_pages_used > 0 for i in server_info.instances)
    assert server_info.policy == "esp" and server_info.ready and server_info.programs_ready > 0


def test_a_repeated_document_hits_the_prefix_cache_in_server_info(client):
    document = " ".join(["Pages of keys and values move between instances; tokens never change."] * 12)
    before = client.server_info().prefix_cache
    for question in (" First question?", " Second question?"):
        assert client.complete(document + question, max_tokens=2, temperature=0).finish_reason == "length"
    info = client.server_info()
    assert info.prefix_cache.queries >= before.queries + 2 and info.prefix_cache.hits >= before.hits + 1
    assert info.prefix_cache.hit_tokens > before.hit_tokens and 0 < info.prefix_cache.token_hit_rate <= 1
    assert sum(instance.kv_pages_cached for instance in info.instances) > 0


def test_abort_rpc_ends_the_stream_and_frees_pages(client, server, engine_port):
    stream = client.generate(PROMPTS[0], max_tokens=200, temperature=0, ignore_eos=True, request_id="to-abort")
    iterator = iter(stream)
    next(iterator)  # the request is running
    with LoongClient(server.target) as other:  # any connection may abort by id
        assert other.abort("to-abort") is True
        assert other.abort("never-existed") is False
    for _ in iterator:
        pass
    assert stream.completion.finish_reason == "abort"
    assert len(stream.completion.token_ids) < 200
    wait_pages_free(engine_port)


def test_cancel_and_deadline_abort_the_request(client, engine_port):
    stream = client.generate(PROMPTS[1], max_tokens=300, temperature=0, ignore_eos=True)
    iterator = iter(stream)
    next(iterator)
    stream.cancel()
    with pytest.raises(grpc.RpcError) as err:
        for _ in iterator:
            pass
    assert err.value.code() == grpc.StatusCode.CANCELLED
    with pytest.raises(grpc.RpcError) as err:
        collect(client.generate(PROMPTS[2], max_tokens=300, temperature=0, ignore_eos=True, timeout=0.5))
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_pages_free(engine_port)
    assert client.complete(PROMPTS[0], max_tokens=2, temperature=0).finish_reason == "length"



def test_an_id_reused_right_after_a_cancel_is_refused_or_answered_in_full(client, reference_llm, engine_port):
    """A client cancels a stream and sends the same request_id again at once, many times: the new call is
    refused with ALREADY_EXISTS while the old request is being released, or answered in full; the old
    request's "abort" never ends the new call (it once ended OK with no token)."""
    expected = _reference(reference_llm, PROMPTS[0], max_tokens=4, temperature=0.0).outputs[0].token_ids
    answered = 0
    for attempt in range(6):
        request_id = f"reused-after-cancel-{attempt % 2}"
        stream = client.generate(PROMPTS[1], request_id=request_id, max_tokens=300, temperature=0, ignore_eos=True)
        next(iter(stream))
        stream.cancel()
        for _ in range(50):
            try:
                completion = client.complete(PROMPTS[0], request_id=request_id, max_tokens=4, temperature=0)
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.ALREADY_EXISTS, err
                time.sleep(0.02)
                continue
            assert completion.finish_reason == "length" and list(completion.token_ids) == expected, attempt
            answered += 1
            break
    assert answered == 6
    wait_pages_free(engine_port)

def test_message_size_limit_and_malformed_messages(client, server):
    with pytest.raises(grpc.RpcError) as err:
        client.complete("x" * (300 * 1024), max_tokens=1)  # the fixture's server takes 256 KiB
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    raw = client.channel.unary_stream("/loong_jax.v1.Generation/Generate",
                                      request_serializer=lambda b: b, response_deserializer=lambda b: b)
    bad_utf8 = b"\x0a\x02\xff\xfe"  # field 1 (text), 2 bytes that are not UTF-8
    truncated = b"\x22\x05\x20"  # field 4 (sampling) claims 5 bytes, carries 1
    for body in (bad_utf8, truncated):
        with pytest.raises(grpc.RpcError) as err:
            list(raw(body))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "loong_jax.v1.GenerateRequest" in err.value.details()


def _scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def test_metrics_endpoint_counts_this_servers_requests(client, server):
    before = _scrape(server.server.metrics_port)
    client.complete(PROMPTS[0], max_tokens=3, temperature=0)
    with pytest.raises(grpc.RpcError):
        client.complete(PROMPTS[0], temperature=-1.0)
    after = _scrape(server.server.metrics_port)
    key = 'loong_jax_requests_finished_total{finish_reason="length"}'
    assert after[key] == before.get(key, 0.0) + 1
    rejected = 'loong_jax_requests_rejected_total{code="INVALID_ARGUMENT"}'
    assert after[rejected] == before.get(rejected, 0.0) + 1
    assert after["loong_jax_generation_tokens_total"] >= before.get("loong_jax_generation_tokens_total", 0) + 3
    assert after["loong_jax_time_to_first_token_seconds_count"] == before.get(
        "loong_jax_time_to_first_token_seconds_count", 0) + 1
    assert after["loong_jax_prefill_dop_count"] >= 1 and after["loong_jax_decode_dop_count"] >= 1
    for instance in range(ENGINE_INSTANCES):
        assert after[f'loong_jax_kv_pages_total{{instance="{instance}"}}'] == ENGINE_KV_PAGES
    for name in ("loong_jax_compiles_total", "loong_jax_compile_seconds_total", "loong_jax_preemptions_total",
                 "loong_jax_migrations_total", "loong_jax_scale_ups_total", "loong_jax_scale_downs_total",
                 "loong_jax_requests_running", "loong_jax_requests_waiting", "loong_jax_requests_late",
                 "loong_jax_oldest_waiting_seconds",
                 "loong_jax_inter_token_latency_seconds_count", "loong_jax_queue_time_seconds_count",
                 "loong_jax_e2e_request_latency_seconds_count"):
        assert name in after, name
    assert after["loong_jax_compiles_total"] > 0


def test_one_json_log_line_per_finished_request(client):
    sink = io.StringIO()
    configure_logging("json", logging.INFO, stream=sink)  # undone after the test (tests/conftest.py)
    completion = client.complete(PROMPTS[0], max_tokens=2, temperature=0, request_id="logged-1")
    time.sleep(0.2)  # the line is written as the handler finishes, just after the last message
    lines = [json.loads(line) for line in sink.getvalue().splitlines()]
    finished = [line for line in lines if line.get("event") == "request_finished"]
    assert len(finished) == 1
    (line,) = finished
    assert line["request_id"] == "logged-1" and line["outcome"] == "length" and line["code"] == "OK"
    assert line["prompt_tokens"] == completion.prompt_tokens and line["completion_tokens"] == 2
    assert line["e2e_s"] > 0 and line["level"] == "info"
