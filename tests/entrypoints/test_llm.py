"""The Python API (`LLM`) and the `loong-jax generate` command: prompt forms (text, token ids, chat
messages), output fields and timings, stop strings, validation before anything is queued."""

from __future__ import annotations

import io

import pytest

from loong_jax.entrypoints.cli import generate_main, main
from loong_jax.sampling.params import SamplingParams
from tests.engine_fixtures import KV_PAGES, PAGE_SIZE
from tests.entrypoints.test_prompts import BAD_PROMPTS

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


@pytest.fixture()
def llm(shared_llm):
    shared_llm.set_policy("fixed", 1, 1, warmup=False)
    return shared_llm


def test_prompt_forms_and_output_fields(llm, reference):
    tokenizer = llm.tokenizer
    text = "The quick brown fox"
    chat = [{"role": "user", "content": "judge my vow"}]
    ids = tokenizer.encode("lazy dog")
    outputs = llm.generate([text, ids, chat, {"prompt_token_ids": ids}], GREEDY, use_tqdm=False)
    assert len({o.request_id for o in outputs}) == len(outputs)
    assert outputs[0].prompt == text and outputs[0].prompt_token_ids == tokenizer.encode(text)
    assert outputs[1].prompt is None and outputs[1].prompt_token_ids == ids
    chat_text = tokenizer.apply_chat_template(chat, add_generation_prompt=True)
    assert outputs[2].prompt == chat_text
    assert outputs[2].prompt_token_ids == tokenizer.encode(chat_text, add_special_tokens=False)
    assert outputs[3].outputs[0].token_ids == outputs[1].outputs[0].token_ids
    for output in outputs:
        completion = output.outputs[0]
        assert completion.token_ids == reference(output.prompt_token_ids, GREEDY.max_tokens, eos_token_ids=())[0]
        assert completion.finish_reason == "length" and completion.logprobs is None
        full = tokenizer.decode(output.prompt_token_ids + completion.token_ids)
        assert full.endswith(completion.text)  # streamed text = the text those tokens add
        metrics = output.metrics
        assert 0 <= metrics.queue_time <= metrics.time_to_first_token
        assert metrics.decode_time >= 0 and metrics.latency >= metrics.time_to_first_token
    # One prompt (not a list) gives a list of one output; a token-id list is one prompt too.
    assert len(llm.generate(text, GREEDY, use_tqdm=False)) == 1
    assert len(llm.generate(ids, GREEDY, use_tqdm=True)) == 1
    llm.engine.check_all_free()


def test_stop_string_cuts_the_text(llm):
    prompt = "Sphinx of black quartz"
    free = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True), use_tqdm=False)[0]
    text = free.outputs[0].text
    assert len(text) >= 4
    stop = text[2:4]  # whatever the model writes, stop where these two characters first appear
    cut = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, stop=[stop]),
                       use_tqdm=False)[0].outputs[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == text[:text.index(stop)]
    assert free.outputs[0].token_ids[:len(cut.token_ids)] == cut.token_ids
    llm.engine.check_all_free()


def test_validation_happens_before_anything_is_queued(llm):
    good = "The quick brown fox"
    cases = [
        ([good, []], GREEDY, "empty"),
        ([good, list(range(4, 4 + 256))], GREEDY, "context of 256"),
        ([list(range(4, 4 + 252))], GREEDY, "252 tokens \\+ max_tokens 6 exceeds the model's context length \\(256\\)"),
        ([good, [5, 10**6]], GREEDY, "must be a token id in"),
        ([good], {"max_tokens": 4, "temprature": 0.0}, "temprature"),
        ([good, good], [GREEDY], "2 prompts"),
        ([good], SamplingParams(stop_token_ids=[llm.config.vocab_size]), "stop_token_ids"),
    ]
    for prompts, params, message in cases:
        with pytest.raises(ValueError, match=message):
            llm.generate(prompts, params, use_tqdm=False)
        assert llm.engine.num_unfinished == 0
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1.0)
    with pytest.raises(ValueError, match="unknown policy 'best'"):
        llm.set_policy("best", warmup=False)
    with pytest.raises(ValueError, match="apply to policy 'fixed'"):
        llm.set_policy("esp", prefill_degree=2, warmup=False)
    with pytest.raises(ValueError, match="must divide"):
        llm.set_policy("fixed", prefill_degree=16, warmup=False)
    llm.set_policy("fixed", 1, 1, warmup=False)
    llm.engine.check_all_free()


@pytest.mark.parametrize("method", ["generate", "stream", "prepare"])
@pytest.mark.parametrize("prompt, message", BAD_PROMPTS)
def test_bad_prompt_is_refused_and_changes_nothing(llm, method, prompt, message):
    calls = {
        "generate": lambda: llm.generate(["The quick brown fox", prompt], GREEDY, use_tqdm=False),
        "stream": lambda: next(llm.stream(prompt, GREEDY)),
        "prepare": lambda: llm.prepare(prompt, GREEDY),
    }
    with pytest.raises(ValueError, match=message):
        calls[method]()
    assert llm.engine.num_unfinished == 0 and not llm.engine.has_unfinished()  # the good prompt was not queued
    llm.engine.check_all_free()  # no pages held


def test_generate_progress_bar_only_on_a_terminal(llm, capsys, monkeypatch):
    monkeypatch.setattr(llm, "progress", True)
    llm.generate(["The quick brown fox", "lazy dog"], GREEDY, use_tqdm=True)
    err = capsys.readouterr().err  # captured: not a terminal
    assert "\r" not in err and "\x1b[" not in err and "generating" not in err


def test_cli_generate_streams_to_stdout(checkpoint_dir, compile_cache_dir, llm, monkeypatch):
    prompt = "The quick brown fox"
    expected = llm.generate(prompt, GREEDY, use_tqdm=False)[0].outputs[0].text
    flags = ["--model", str(checkpoint_dir), "--instances", "1", "--page-size", str(PAGE_SIZE),
             "--kv-pages", str(KV_PAGES), "--policy", "fixed", "--prefill-degree", "1", "--decode-degree", "1",
             "--no-warmup", "--compilation-cache-dir", str(compile_cache_dir), "--max-tokens", "6", "--ignore-eos"]
    out = io.StringIO()
    assert generate_main([prompt] + flags, stdout=out) == 0
    assert out.getvalue() == expected + "\n"
    out = io.StringIO()
    assert generate_main(flags, stdout=out, stdin=io.StringIO(prompt)) == 0  # prompt from stdin
    assert out.getvalue() == expected + "\n"
    out = io.StringIO()
    assert generate_main([prompt, "--no-scan-layers"] + flags, stdout=out) == 0  # one layer module per layer
    assert out.getvalue() == expected + "\n"
    with pytest.raises(SystemExit):
        generate_main([prompt, "--temperature", "-2"])  # refused before any model is loaded
    assert main([]) == 2  # no command: help


def test_engine_config_is_what_llm_takes_and_is_checked_when_made(llm):
    from loong_jax.entrypoints.engine_config import EngineConfig
    from loong_jax.entrypoints.llm import LLM

    assert (llm.engine_config.page_size, llm.engine_config.kv_pages) == (PAGE_SIZE, KV_PAGES)
    positional = EngineConfig("folder", 2, 4, 8, 100, "fixed", 2, 1)  # LLM's positional order
    assert (positional.tp, positional.instances, positional.page_size, positional.kv_pages) == (2, 4, 8, 100)
    assert (positional.policy, positional.prefill_degree, positional.decode_degree) == ("fixed", 2, 1)
    with pytest.raises(TypeError):
        EngineConfig(None, 1, None, 16, None, "esp", None, None, "a tokenizer")  # the rest by keyword only
    with pytest.raises(ValueError, match="page_size must be >= 1"):
        LLM(page_size=0)
    with pytest.raises(ValueError, match="kv_pages must be >= 1"):
        EngineConfig(kv_pages=0)
    with pytest.raises(ValueError, match="not both"):
        LLM(engine_config=EngineConfig(), tp=2)



def test_scan_layers_option_loads_a_checkpoint_either_way(checkpoint_dir):
    from loong_jax.entrypoints.engine_config import load_checkpoint

    scanned, unrolled = load_checkpoint(checkpoint_dir, None), load_checkpoint(checkpoint_dir, None, False)
    assert scanned.config.scan_layers and not unrolled.config.scan_layers
    assert load_checkpoint(scanned, None, True) is scanned
    with pytest.raises(ValueError, match="scan_layers cannot be changed"):
        load_checkpoint(scanned, None, False)
