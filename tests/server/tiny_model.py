"""A tiny Llama checkpoint with a real byte-level BPE tokenizer, for server tests that need a model
folder when the shipped demo model is not there.

1. `train_tokenizer` (the demo model's own recipe) learns a 384-token byte-level BPE from a few
   fixed paragraphs, with the demo's special tokens and ChatML template.
2. A 2-layer, 64-wide Llama with random weights (`init_model`, fixed seed) is saved in Hugging Face
   format next to it, so `LLM(model=folder)` loads it like any checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

from loong_jax.models.config import ModelConfig
from loong_jax.models.demo_corpus import Document
from loong_jax.models.demo_tokenizer import BOS, EOS, IM_END, PAD, special_token_ids, tokenizer_files, train_tokenizer
from loong_jax.models.llama import init_model
from loong_jax.models.loading import save_hf_checkpoint

CORPUS = (
    "Return the number of items in a container. The argument may be a sequence or a collection.",
    "This module provides functions for working with paths: join, split, normalise and expand them.",
    "Create a new socket using the given address family, socket type and protocol number.",
    "If the file does not exist, it is created; otherwise it is truncated before writing begins.",
    "Streams of bytes are decoded into text with an encoding such as UTF-8 — naïve café, 日本語, ½.",
    "A server answers requests from clients; each request is validated, queued, scheduled and served.",
)
MAX_CONTEXT = 512


def build_tiny_model(folder: Path, seed: int = 0) -> Path:
    documents = [Document("module", f"doc{i}", text) for i, text in enumerate(CORPUS * 3)]
    tokenizer = train_tokenizer(documents, vocab_size=384)
    ids = special_token_ids(tokenizer)
    config = ModelConfig(model_type="llama", vocab_size=tokenizer.get_vocab_size(), hidden_size=64,
                         intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                         max_position_embeddings=MAX_CONTEXT, tie_word_embeddings=True, dtype="float32",
                         bos_token_id=ids[BOS], eos_token_ids=(ids[EOS], ids[IM_END]), pad_token_id=ids[PAD])
    save_hf_checkpoint(init_model(config, seed=seed), config, folder)
    tokenizer.save(str(folder / "tokenizer.json"))
    for name, content in tokenizer_files(tokenizer, MAX_CONTEXT).items():
        (folder / name).write_text(json.dumps(content, indent=2) + "\n")
    return folder
