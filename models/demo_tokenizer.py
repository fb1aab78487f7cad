"""The demo model's tokenizer and its training stream.

Data flow:
  1. `format_documents(documents)` turns each stdlib docstring into one
     training string: most are plain (`<|bos|>text<|eos|>`); every
     `CHAT_EVERY`-th documented function or class becomes a one-turn chat in
     the ChatML layout of `CHAT_TEMPLATE` ("What does os.path.join do?" ->
     its docstring), so that chat requests to the demo model get sensible
     answers.
  2. `train_tokenizer(documents, vocab_size)` trains a byte-level BPE with the
     `tokenizers` library on the raw docstrings; the special tokens get the
     first ids, and a post-processor puts `<|bos|>` in front of every encoded
     text (what `add_bos_token` in tokenizer_config.json says).
  3. `pack_stream(token_lists, seq_len, rng)` shuffles the documents, joins
     them into one stream and cuts it into rows of `seq_len` tokens. Every
     token carries its document's segment id and its position inside the
     document, so attention never crosses documents and no slot is padding.
  4. `tokenizer_files(...)` returns the JSON side files (tokenizer_config,
     generation_config) written next to tokenizer.json.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from loong_jax.models.demo_corpus import Document

PAD, BOS, EOS, IM_START, IM_END = "<|pad|>", "<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (PAD, BOS, EOS, IM_START, IM_END)  # ids 0..4, in this order

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHAT_EVERY = 4  # one in CHAT_EVERY named docstrings is phrased as a chat turn
CHAT_QUESTIONS = ("What does {name} do?", "Explain {name}.", "Describe {name} briefly.",
                  "What is {name} for?")


def chat_text(name: str, answer: str, question_index: int) -> str:
    """The training string of one chat turn, exactly as CHAT_TEMPLATE renders it
    plus the assistant's answer."""
    question = CHAT_QUESTIONS[question_index % len(CHAT_QUESTIONS)].format(name=name)
    return (f"{BOS}{IM_START}user\n{question}{IM_END}\n"
            f"{IM_START}assistant\n{answer}{IM_END}\n")


def format_documents(documents: list[Document]) -> list[str]:
    """One training string per document (special tokens spelled out)."""
    texts = []
    definitions_seen = 0  # classes and functions so far; modules stay plain text
    for document in documents:
        is_definition = document.kind != "module"
        if is_definition and definitions_seen % CHAT_EVERY == CHAT_EVERY - 1:
            texts.append(chat_text(document.name, document.text, definitions_seen // CHAT_EVERY))
        else:
            texts.append(f"{BOS}{document.text}{EOS}")
        definitions_seen += is_definition
    return texts


def train_tokenizer(documents: list[Document], vocab_size: int) -> Tokenizer:
    """Byte-level BPE over the docstrings (and the chat questions' words)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    questions = [q.format(name="name") for q in CHAT_QUESTIONS] + ["user", "assistant"]
    tokenizer.train_from_iterator([d.text for d in documents] + questions, trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1", special_tokens=[(BOS, bos_id)]
    )
    return tokenizer


def special_token_ids(tokenizer: Tokenizer) -> dict[str, int]:
    return {token: tokenizer.token_to_id(token) for token in SPECIAL_TOKENS}


def encode_texts(tokenizer: Tokenizer, texts: list[str]) -> list[np.ndarray]:
    """Token ids of each formatted training string (special tokens are in the text)."""
    encodings = tokenizer.encode_batch(texts, add_special_tokens=False)
    return [np.asarray(e.ids, dtype=np.int32) for e in encodings]


@dataclasses.dataclass(frozen=True)
class PackedRows:
    tokens: np.ndarray  # [rows, seq_len] int32
    positions: np.ndarray  # [rows, seq_len] int32, position inside the document
    segment_ids: np.ndarray  # [rows, seq_len] int32, document index (>= 0)
    targets: np.ndarray  # [rows, seq_len] int32, next token of the same document
    loss_mask: np.ndarray  # [rows, seq_len] float32, 1 where the target exists

    @property
    def num_rows(self) -> int:
        return self.tokens.shape[0]


def pack_stream(token_lists: list[np.ndarray], seq_len: int, rng: np.random.Generator) -> PackedRows:
    """Shuffle the documents, join them and cut the stream into full rows.

    A document cut by a row boundary continues in the next row with its own
    positions; the tail that does not fill a row is dropped (a different
    shuffle next epoch drops a different tail)."""
    order = rng.permutation(len(token_lists))
    stream = np.concatenate([token_lists[i] for i in order])  # [total]
    segments = np.concatenate([np.full(len(token_lists[i]), n, np.int32) for n, i in enumerate(order)])
    positions = np.concatenate([np.arange(len(token_lists[i]), dtype=np.int32) for i in order])
    rows = len(stream) // seq_len
    shape = (rows, seq_len)
    tokens = stream[: rows * seq_len].reshape(shape)
    segment_ids = segments[: rows * seq_len].reshape(shape)
    positions = positions[: rows * seq_len].reshape(shape)
    targets = np.zeros(shape, np.int32)
    targets[:, :-1] = tokens[:, 1:]
    loss_mask = np.zeros(shape, np.float32)
    loss_mask[:, :-1] = segment_ids[:, 1:] == segment_ids[:, :-1]
    return PackedRows(tokens, positions, segment_ids, targets, loss_mask)


def tokenizer_files(tokenizer: Tokenizer, max_length: int) -> dict[str, dict[str, Any]]:
    """tokenizer_config.json and generation_config.json for the demo checkpoint."""
    ids = special_token_ids(tokenizer)
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": max_length,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    generation_config = {
        "bos_token_id": ids[BOS],
        "eos_token_id": [ids[EOS], ids[IM_END]],
        "pad_token_id": ids[PAD],
        "do_sample": False,
        "max_new_tokens": 64,
    }
    return {"tokenizer_config.json": tokenizer_config, "generation_config.json": generation_config}
