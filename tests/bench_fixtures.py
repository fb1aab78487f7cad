"""A tiny checkpoint (random Llama + a small byte-level BPE tokenizer) for the eval and bench tests (registered
in tests/conftest.py)."""

from __future__ import annotations

import json

import jax
import pytest
from flax import nnx
from tokenizers import Tokenizer as FastTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from loong_jax.executor.jax_executor import Buckets
from loong_jax.models.config import ModelConfig
from loong_jax.models.llama import init_model
from loong_jax.models.loading import save_hf_checkpoint

CORPUS = ["Benchmarks measure what a server does under load.",
          "Every request streams its tokens back as they are made.",
          "A batch file of prompts becomes a file of answers."] * 10
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
# One bucket per program kind for every workload of these tests: few compilations.
BUCKETS = Buckets(prefill_rows=128, prefill_requests=8, decode_batch=8, decode_pages=16, migration_slots=64)
ENGINE = dict(instances=1, page_size=8, kv_pages=96, policy="fixed", prefill_degree=1, decode_degree=1,
              buckets=BUCKETS, warmup=False, progress=False)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench_checkpoint")
    fast = FastTokenizer(models.BPE())
    fast.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    fast.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>", "<|user|>", "<|assistant|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    fast.train_from_iterator(CORPUS, trainer)
    fast.save(str(folder / "tokenizer.json"))
    config = ModelConfig(model_type="llama", vocab_size=fast.get_vocab_size(), hidden_size=64,
                         intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                         max_position_embeddings=256, bos_token_id=0, eos_token_ids=(1,))
    model = init_model(config.with_scan_layers(False), seed=3)  # one module a layer: ndim >= 2 picks the matrices
    # Large weights make greedy choices decisive (no near-ties between the engine and the reference).
    nnx.update(model, jax.tree.map(lambda x: x * 12.0 if x.ndim >= 2 else x, nnx.state(model, nnx.Param)))
    save_hf_checkpoint(model, config, folder)
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "chat_template": CHAT_TEMPLATE, "add_bos_token": True}))
    return folder


@pytest.fixture(scope="session")
def compile_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("bench_compile_cache")
