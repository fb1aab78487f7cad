"""The engine's greedy tokens equal Hugging Face `transformers`' greedy generation on the same checkpoint:
the shipped demo model and a Qwen2-style checkpoint (q/k/v biases), prefilled by a ring of 2 instances
that keeps each prompt on one of them (scale-down) and decoded there."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import transformers

from loong_jax.models.demo import DEMO_MODEL_DIR
from loong_jax.sampling.params import SamplingParams
from tests.engine_fixtures import PAGE_SIZE, TEST_BUCKETS, record_plans
from tests.models.tiny_hf import build_hf_model, hf_greedy, save_hf_model

MAX_TOKENS = 8


@pytest.fixture(scope="module", params=["demo", "qwen2_bias"])
def checkpoint(request, checkpoint_dir, tmp_path_factory):
    """(folder, transformers model) of one checkpoint."""
    if request.param == "demo":
        return DEMO_MODEL_DIR, transformers.AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR).eval()
    hf_model = build_hf_model("qwen2_bias", seed=1)
    folder = save_hf_model(hf_model, tmp_path_factory.mktemp("qwen2_bias"))
    shutil.copy(checkpoint_dir / "tokenizer.json", folder / "tokenizer.json")
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return folder, hf_model


def test_engine_matches_transformers(checkpoint, compile_cache_dir):
    from loong_jax.entrypoints.llm import LLM

    folder, hf_model = checkpoint
    llm = LLM(folder, instances=2, page_size=PAGE_SIZE, kv_pages=64, policy="fixed", prefill_degree=2,
              decode_degree=1, buckets=TEST_BUCKETS, warmup=False, compilation_cache_dir=compile_cache_dir,
              progress=False)
    try:
        vocab = min(llm.config.vocab_size, llm.tokenizer.vocab_size)
        rng = np.random.default_rng(4)
        prompts = [rng.integers(5, vocab, size=int(n)).tolist() for n in (3, 17, 30, 9)]
        plans = record_plans(llm)
        # Both stop at the checkpoint's EOS ids when it names some (the demo model), else neither does.
        ignore_eos = hf_model.generation_config.eos_token_id is None
        outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=ignore_eos),
                               use_tqdm=False)
        for prompt, output in zip(prompts, outputs):
            assert output.outputs[0].token_ids == hf_greedy(hf_model, prompt, MAX_TOKENS)
        placements = [segments for plan in plans for batch in plan.prefills for segments in batch.placement]
        assert placements and all(len(segments) == 1 for segments in placements)  # kept on one of the two
        llm.engine.check_all_free()
    finally:
        llm.close()
