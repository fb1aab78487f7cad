"""Abort mid-stream frees the request's pages within one step (at once when it is between units, when its
unit returns when it is running), ends its stream with finish_reason "abort", and leaves the other
requests' tokens exactly as the reference's. Also through `AsyncLLM`, from another thread."""

from __future__ import annotations

import asyncio

import pytest

from loong_jax.outputs import RequestOutput
from loong_jax.sampling.params import SamplingParams
from tests.engine_fixtures import KV_PAGES, PAGE_SIZE, TEST_BUCKETS, mixed_prompts
from tests.entrypoints.test_prompts import BAD_PROMPTS

LONG = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)


def test_abort_frees_pages_within_one_step(shared_llm, reference):
    shared_llm.set_policy("fixed", 1, 1, warmup=False)
    engine = shared_llm.engine
    prompts = mixed_prompts(shared_llm.config.vocab_size, count=4, seed=9)
    requests = [shared_llm.prepare(prompt, LONG) for prompt in prompts]
    results = {r.request_id: RequestOutput(r.request_id, None, list(r.prompt_token_ids), [], False) for r in requests}
    between, running = requests[1].request_id, requests[2].request_id
    for request in requests:
        engine.add_request(request)

    def step():
        for delta in engine.step():
            results[delta.request_id] = results[delta.request_id].merged(delta)

    while len(results[between].outputs[0].token_ids if results[between].outputs else ()) < 3:
        step()
    # Between units: the pages are free before the next step even starts.
    assert engine.pages_held(between) > 0 and engine.abort(between)
    assert engine.pages_held(between) == 0 and not engine.is_running(between)

    # While its unit runs: the pages are free when that unit returns, inside the same step.
    submit = engine.executor.submit

    def submit_then_abort(plan, inputs):
        submit(plan, inputs)
        if engine.is_running(running) and engine.pages_held(running) > 0:
            engine.abort(running)

    engine.executor.submit = submit_then_abort
    try:
        step()
    finally:
        engine.executor.submit = submit
    assert engine.pages_held(running) == 0 and not engine.is_running(running)
    while engine.has_unfinished():
        step()
    for request_id in (between, running):
        completion = results[request_id].outputs[0]
        assert completion.finish_reason == "abort" and results[request_id].finished
        assert 3 <= len(completion.token_ids) < LONG.max_tokens
    for prompt, request in zip(prompts, requests):
        if request.request_id not in (between, running):
            tokens, _ = reference(prompt, LONG.max_tokens, eos_token_ids=())
            assert results[request.request_id].outputs[0].token_ids == tokens
    engine.check_all_free()


@pytest.fixture(scope="module")
def async_llm(checkpoint_dir, compile_cache_dir):
    from loong_jax.entrypoints.async_llm import AsyncLLM

    engine = AsyncLLM(checkpoint_dir, instances=1, page_size=PAGE_SIZE, kv_pages=KV_PAGES, policy="fixed",
                      prefill_degree=1, decode_degree=1, buckets=TEST_BUCKETS, warmup=False,
                      compilation_cache_dir=compile_cache_dir, progress=False)
    yield engine
    engine.shutdown()


def test_async_streams_and_aborts(async_llm, reference):
    prompts = mixed_prompts(async_llm.llm.config.vocab_size, count=3, seed=10)
    short = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    long = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)

    async def collect(prompt, params, request_id, stop_after=None):
        merged, deltas = None, 0
        async for delta in async_llm.generate(prompt, params, request_id):
            assert delta.delta and delta.request_id == request_id
            merged = delta if merged is None else merged.merged(delta)
            deltas += 1
            if stop_after is not None and deltas == stop_after:
                aborted = await async_llm.abort(request_id)
                assert aborted
                assert not async_llm.llm.engine.is_running(request_id)  # pages freed when abort returns
        return merged, deltas

    async def main():
        left = asyncio.ensure_future(collect(prompts[0], short, "a"))
        right = asyncio.ensure_future(collect(prompts[1], short, "b"))
        cut = asyncio.ensure_future(collect(prompts[2], long, "c", stop_after=2))
        return await asyncio.gather(left, right, cut)

    (a, a_deltas), (b, _), (c, _) = asyncio.run(main())
    assert a_deltas > 1  # streamed, not delivered at the end
    for output, prompt in ((a, prompts[0]), (b, prompts[1])):
        assert output.finished and output.outputs[0].finish_reason == "length"
        assert output.outputs[0].token_ids == reference(prompt, short.max_tokens, eos_token_ids=())[0]
    assert c.finished and c.outputs[0].finish_reason == "abort" and len(c.outputs[0].token_ids) < 200

    async def leave_early():
        async for _ in async_llm.generate(prompts[2], long, "d"):
            break  # the consumer goes away: the request is aborted

    asyncio.run(leave_early())
    with pytest.raises(ValueError, match="empty"):
        asyncio.run(anext(async_llm.generate([], short)))
    asyncio.run(_until_idle(async_llm))
    async_llm.llm.engine.check_all_free()


@pytest.mark.parametrize("prompt, message", BAD_PROMPTS)
def test_async_bad_prompt_is_refused_and_changes_nothing(async_llm, prompt, message):
    with pytest.raises(ValueError, match=message):
        asyncio.run(anext(async_llm.generate(prompt, LONG)))
    assert not async_llm._streams and not async_llm._commands  # nothing registered, nothing posted
    assert not async_llm.llm.engine.has_unfinished()
    async_llm.llm.engine.check_all_free()


@pytest.mark.parametrize("request_id", [5, ["a"], ""])
def test_async_bad_request_id_is_a_value_error(async_llm, request_id):
    with pytest.raises(ValueError, match="request_id must be a non-empty string"):
        asyncio.run(anext(async_llm.generate("The quick brown fox", LONG, request_id)))
    assert not async_llm._streams and not async_llm.llm.engine.has_unfinished()


async def _until_idle(async_llm, timeout_s: float = 30.0):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while async_llm.llm.engine.has_unfinished() or async_llm.llm.executor.in_flight:
        assert loop.time() < deadline, "engine did not become idle"
        await asyncio.sleep(0.01)


def test_an_id_reused_right_after_its_stream_was_left_gets_its_own_tokens(async_llm, reference):
    """The server's release path, many times over: a consumer leaves a stream early, waits for the abort
    (`AsyncLLM.abort`), and the same id is sent again at once. The old request's final "abort" output must
    never reach the new stream (it once ended the new request with no token), and the id must be free
    again as soon as the abort returned."""
    prompts = mixed_prompts(async_llm.llm.config.vocab_size, count=2, seed=12)
    long = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
    short = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    expected = reference(prompts[1], short.max_tokens, eos_token_ids=())[0]

    async def leave_then_reuse(request_id: str, leave_after: int):
        stream = async_llm.generate(prompts[0], long, request_id)
        deltas = 0
        async for _ in stream:
            deltas += 1
            if deltas == leave_after:
                break
        await stream.aclose()
        await async_llm.abort(request_id)
        merged = None
        async for delta in async_llm.generate(prompts[1], short, request_id):
            merged = delta if merged is None else merged.merged(delta)
        return merged

    for attempt in range(8):
        output = asyncio.run(leave_then_reuse(f"reused-{attempt % 2}", leave_after=1 + attempt % 3))
        assert output.finished and output.outputs[0].finish_reason == "length", attempt
        assert output.outputs[0].token_ids == expected, attempt
    asyncio.run(_until_idle(async_llm))
    assert not async_llm._streams
    async_llm.llm.engine.check_all_free()


def test_an_abort_whose_caller_gives_up_waiting_leaves_the_engine_running(async_llm, reference):
    """A server handler cancelled while it awaits `abort` (its client went away) cancels the abort's future;
    answering that future later must not stop the engine thread (it once did, with InvalidStateError)."""
    prompts = mixed_prompts(async_llm.llm.config.vocab_size, count=2, seed=13)
    long = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
    short = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)

    async def abort_then_give_up(request_id: str):
        stream = async_llm.generate(prompts[0], long, request_id)
        await anext(stream)
        waiting = asyncio.ensure_future(async_llm.abort(request_id))
        await asyncio.sleep(0)  # the abort is posted; its answer comes after the engine's next step
        waiting.cancel()
        await stream.aclose()
        merged = None
        async for delta in async_llm.generate(prompts[1], short):
            merged = delta if merged is None else merged.merged(delta)
        return merged

    for attempt in range(3):
        output = asyncio.run(abort_then_give_up(f"given-up-{attempt}"))
        assert output.outputs[0].token_ids == reference(prompts[1], short.max_tokens, eos_token_ids=())[0]
    assert async_llm.dead_error is None
    asyncio.run(_until_idle(async_llm))
    async_llm.llm.engine.check_all_free()
