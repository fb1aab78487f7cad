"""The engine with `LOONG_JAX_ATTENTION=interpret` (read once, when the engine is built): every prefill
ring step and decode step runs the project's Pallas kernels in interpret mode on CPU, and the greedy tokens
equal the single-device reference loop's."""

from __future__ import annotations

from loong_jax.sampling.params import SamplingParams
from tests.engine_fixtures import KV_PAGES, PAGE_SIZE, TEST_BUCKETS, mixed_prompts

MAX_TOKENS = 4


def test_interpreted_kernels_match_reference(checkpoint_dir, compile_cache_dir, reference, monkeypatch):
    from loong_jax.entrypoints.llm import LLM

    monkeypatch.setenv("LOONG_JAX_ATTENTION", "interpret")
    llm = LLM(checkpoint_dir, page_size=PAGE_SIZE, kv_pages=KV_PAGES, policy="fixed", prefill_degree=2,
              decode_degree=2, buckets=TEST_BUCKETS, warmup=False, compilation_cache_dir=compile_cache_dir,
              progress=False)
    monkeypatch.delenv("LOONG_JAX_ATTENTION")  # read at construction only: the engine keeps its choice
    try:
        assert llm.engine.executor.attention_impl == "interpret"
        prompts = mixed_prompts(llm.config.vocab_size, count=4, seed=3)
        outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS), use_tqdm=False)
        for prompt, output in zip(prompts, outputs):
            assert output.outputs[0].token_ids == reference(prompt, MAX_TOKENS)[0]
        llm.engine.check_all_free()
    finally:
        llm.close()
