"""The shipped demo model and the pieces that made it.

1. The checkpoint folder is complete and at most 20 MB.
2. It loads with our loader and with `transformers`; both tokenizers agree,
   prompt logits agree and the greedy continuations are the same tokens.
3. The continuation of an English prompt looks like English (mostly letters,
   several real words of the stdlib docstrings).
4. The trainer's parts: corpus filtering, packing with segment ids, and a
   few optimizer steps on a tiny model that lower the loss.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from loong_jax.models.config import ModelConfig
from loong_jax.models.demo import DEMO_MODEL_DIR, DEMO_MODEL_FILES, resolve_model_path
from loong_jax.models.demo_corpus import Document, collect_documents, normalise_docstring
from loong_jax.models.demo_tokenizer import (BOS, EOS, IM_END, IM_START, format_documents,
                                             pack_stream, train_tokenizer)
from loong_jax.models.generate import generate
from loong_jax.models.llama import init_model
from loong_jax.models.loading import load_hf_checkpoint
from loong_jax.models.tokenizer import Tokenizer
from loong_jax.models.train_demo import TrainSettings, demo_config, train

PROMPT = "Return the number of"
TEXT_PROMPTS = ("Return the number of", "This module provides", "Create a new", "Raise an exception if")
NEW_TOKENS = 24
MAX_FOLDER_BYTES = 20_000_000  # 20 MB


@pytest.fixture(scope="module")
def ours():
    model, config = load_hf_checkpoint(DEMO_MODEL_DIR)
    return model, config, Tokenizer.from_dir(DEMO_MODEL_DIR)


@pytest.fixture(scope="module")
def hf():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)


def hf_greedy(model, prompt_ids: list[int], new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        for _ in range(new_tokens):
            next_id = model(ids).logits[0, -1].argmax()
            ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
    return ids[0, len(prompt_ids):].tolist()


def test_demo_folder_is_complete_and_small():
    assert resolve_model_path(None) == DEMO_MODEL_DIR == resolve_model_path("demo")
    for name in DEMO_MODEL_FILES:
        assert (DEMO_MODEL_DIR / name).is_file(), name
    total = sum(f.stat().st_size for f in DEMO_MODEL_DIR.iterdir() if f.is_file())
    assert total <= MAX_FOLDER_BYTES, total
    config = ModelConfig.from_json(DEMO_MODEL_DIR)
    assert (config.model_type, config.tie_word_embeddings, config.dtype) == ("llama", True, "float32")
    assert config.num_heads > config.num_kv_heads  # grouped-query attention
    with pytest.raises(FileNotFoundError, match="no_such_model"):
        resolve_model_path(DEMO_MODEL_DIR.parent / "no_such_model")


def test_tokenizers_agree(ours, hf):
    _, _, tokenizer = ours
    _, hf_tokenizer = hf
    texts = [PROMPT, "Open the file and return a stream.\n\n    x = f(1)  # note", "naïve café"]
    for text in texts:
        ids = tokenizer.encode(text)
        assert ids[0] == tokenizer.bos_token_id == tokenizer.token_to_id(BOS)
        assert ids == hf_tokenizer(text)["input_ids"]
        assert tokenizer.decode(ids) == text
    messages = [{"role": "user", "content": "What does os.path.join do?"}]
    text = tokenizer.apply_chat_template(messages)
    assert text == hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == f"{BOS}{IM_START}user\nWhat does os.path.join do?{IM_END}\n{IM_START}assistant\n"
    assert set(tokenizer.eos_token_ids) == {tokenizer.token_to_id(EOS), tokenizer.token_to_id(IM_END)}


def test_ours_and_transformers_agree_on_the_demo_model(ours, hf):
    model, config, tokenizer = ours
    hf_model, _ = hf
    prompt_ids = tokenizer.encode(PROMPT)
    tokens = np.asarray(prompt_ids, np.int32)
    logits, _ = model(tokens, np.arange(len(tokens), dtype=np.int32), np.zeros(len(tokens), np.int32))
    with torch.no_grad():
        hf_logits = hf_model(torch.tensor([prompt_ids])).logits[0].numpy()
    np.testing.assert_allclose(np.asarray(logits), hf_logits, atol=1e-4, rtol=0)

    ours_tokens = generate(model, prompt_ids, NEW_TOKENS).tokens
    assert ours_tokens == hf_greedy(hf_model, prompt_ids, NEW_TOKENS)
    assert len(ours_tokens) == NEW_TOKENS


def test_continuation_looks_like_text(ours):
    model, config, tokenizer = ours
    text = ""
    for prompt in TEXT_PROMPTS:  # each continues until its end-of-text token
        result = generate(model, tokenizer.encode(prompt), 32, eos_token_ids=config.eos_token_ids)
        text += tokenizer.decode(result.tokens) + "\n"
    assert len(text) >= 40, text
    texty = sum(ch.isalpha() or ch.isspace() or ch in ".,;:'\"()-`" for ch in text)
    assert texty / len(text) > 0.8, text
    corpus_words = {w.lower() for d in collect_documents() for w in re.findall(r"[A-Za-z]{3,}", d.text)}
    words = {w.lower() for w in re.findall(r"[A-Za-z]{3,}", text)}
    assert len(words & corpus_words) >= 6, text


def test_docstring_normalisation():
    doc = """Summary line.

        Indented body that explains things.
        >>> do_something()
        42



        End."""
    assert normalise_docstring(doc) == ("Summary line.\n\nIndented body that explains things.\n42\n\nEnd.")
    assert normalise_docstring("Too short.") is None
    assert normalise_docstring("0x00 | 0x01 | 0x02 | 0x03 | 0x04 | 0x05 | 0x06 | 0x07 |") is None


def test_packing_keeps_documents_apart():
    docs = [np.arange(100, 100 + n, dtype=np.int32) for n in (5, 3, 9, 4)]
    rows = pack_stream(docs, seq_len=6, rng=np.random.default_rng(0))
    assert rows.tokens.shape == (3, 6)  # 21 tokens -> 3 full rows, tail of 3 dropped
    flat_tokens, flat_segments, flat_positions = (a.reshape(-1) for a in
                                                  (rows.tokens, rows.segment_ids, rows.positions))
    order = []
    for segment in flat_segments:
        if not order or order[-1] != segment:
            order.append(int(segment))
    assert len(order) == len(set(order))  # each document is one contiguous run
    for segment in order:
        run = flat_segments == segment
        assert (np.diff(flat_positions[run]) == 1).all()
        assert (flat_tokens[run] - flat_tokens[run][0] == flat_positions[run] - flat_positions[run][0]).all()
    for r in range(rows.num_rows):
        for t in range(5):
            same = rows.segment_ids[r, t] == rows.segment_ids[r, t + 1]
            assert rows.loss_mask[r, t] == same
            if same:
                assert rows.targets[r, t] == rows.tokens[r, t + 1]
        assert rows.loss_mask[r, 5] == 0  # the last slot has no next token in this row


def test_trainer_lowers_the_loss():
    documents = [Document("function", f"mod.f{i}", f"Return the number of items in bucket {i}. "
                          "The result is an integer and never negative.") for i in range(40)]
    tokenizer = train_tokenizer(documents, vocab_size=300)
    texts = format_documents(documents)
    assert sum(IM_START in t for t in texts) == 10  # every 4th definition is a chat turn
    token_lists = [np.asarray(tokenizer.encode(t, add_special_tokens=False).ids, np.int32) for t in texts]
    settings = TrainSettings(vocab_size=300, hidden_size=32, intermediate_size=64, num_layers=2,
                             num_heads=4, num_kv_heads=2, head_dim=8, seq_len=64, batch_size=4,
                             steps=30, warmup_steps=5, peak_lr=1e-2)
    ids = {token: tokenizer.token_to_id(token) for token in ("<|pad|>", BOS, EOS, IM_START, IM_END)}
    model = init_model(demo_config(settings, ids), seed=0)
    embedding_before = np.array(model.embed_tokens.embedding[...])
    summary = train(model, token_lists, settings, log_every=1)
    assert summary["first_loss"] > 5.0 > summary["final_loss"] + 2.0, summary
    assert not np.allclose(embedding_before, model.embed_tokens.embedding[...])  # trained in place
