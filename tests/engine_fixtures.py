"""Shared fixtures of the engine tests: a tiny checkpoint folder and one LLM whose compiled programs every
engine test reuses (programs are keyed by (kind, group, bucket), not by policy)."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from flax import nnx
from tokenizers import Tokenizer as FastTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from loong_jax.executor.jax_executor import Buckets
from loong_jax.models.config import ModelConfig
from loong_jax.models.generate import generate
from loong_jax.models.llama import init_model
from loong_jax.models.loading import load_hf_checkpoint, save_hf_checkpoint

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Sphinx of black quartz, judge my vow!",
    "Pages of keys and values move between instances; tokens never change.",
    "Ünïcödé and emoji 🦊 are bytes too.",
] * 10
SPECIALS = ["<s>", "</s>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
PAGE_SIZE = 4
KV_PAGES = 160  # 640 token slots per instance: the 16-request workloads fit on one instance
# One shape bucket per program kind for every test workload: few compilations in all.
TEST_BUCKETS = Buckets(prefill_rows=64, prefill_requests=16, decode_batch=16, decode_pages=32,
                       migration_slots=64)


def make_config(vocab_size: int, **changes) -> ModelConfig:
    fields = dict(model_type="llama", vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                  num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=256,
                  bos_token_id=0, eos_token_ids=(1,))
    fields.update(changes)
    return ModelConfig(**fields)


def write_checkpoint(folder, config: ModelConfig, seed: int):
    """A random model with decisive logits (weights scaled up, so greedy ties are practically
    impossible) plus the tokenizer files, as a Hugging Face folder."""
    model = init_model(config.with_scan_layers(False), seed)  # one module a layer: ndim >= 2 picks the matrices
    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda x: x * 12.0 if x.ndim >= 2 else x, params))
    save_hf_checkpoint(model, config, folder)
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "chat_template": CHAT_TEMPLATE, "add_bos_token": True}))
    return folder


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_checkpoint")
    fast = FastTokenizer(models.BPE())
    fast.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    fast.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    fast.train_from_iterator(CORPUS, trainer)
    fast.save(str(folder / "tokenizer.json"))
    return write_checkpoint(folder, make_config(fast.get_vocab_size()), seed=7)


@pytest.fixture(scope="session")
def compile_cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("jax_compilation_cache")


@pytest.fixture(scope="session")
def reference_model(checkpoint_dir):
    model, _ = load_hf_checkpoint(checkpoint_dir)
    return model


@pytest.fixture(scope="session")
def reference(reference_model):
    """(prompt ids, max_tokens, eos ids) -> (tokens, finish reason) of the single-device reference loop."""
    memo = {}

    def run(prompt_ids, max_tokens, eos_token_ids=(1,)):
        key = (tuple(prompt_ids), max_tokens, tuple(eos_token_ids))
        if key not in memo:
            result = generate(reference_model, list(prompt_ids), max_tokens, eos_token_ids=eos_token_ids)
            memo[key] = (result.tokens, result.finish_reason)
        return memo[key]

    return run


@pytest.fixture(scope="session")
def shared_llm(checkpoint_dir, compile_cache_dir):
    """8 instances of one device each; tests switch its policy (`set_policy`), programs stay compiled."""
    from loong_jax.entrypoints.llm import LLM

    llm = LLM(checkpoint_dir, page_size=PAGE_SIZE, kv_pages=KV_PAGES, policy="fixed", prefill_degree=1,
              decode_degree=1, buckets=TEST_BUCKETS, warmup=False, compilation_cache_dir=compile_cache_dir,
              progress=False)
    yield llm
    llm.close()


def mixed_prompts(vocab_size: int, count: int = 16, seed: int = 0, low: int = 3, high: int = 40):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(low, high + 1, size=count)
    lengths[0], lengths[-1] = low, high  # the extremes are always there
    # Ids 4.. avoid the special tokens (BOS/EOS/chat markers) inside prompts.
    return [rng.integers(4, vocab_size, size=int(n)).tolist() for n in lengths]


def record_plans(llm) -> list:
    """Wrap the engine's policy so the test sees every plan it makes."""
    plans, policy = [], llm.engine.policy

    class Recording:
        name = policy.name

        def schedule(self, view):
            plans.append(policy.schedule(view))
            return plans[-1]

        def __getattr__(self, attribute):  # the policy's other answers (token limits, warm-up groups, ...)
            return getattr(policy, attribute)

    llm.engine.core.policy = Recording()
    return plans
