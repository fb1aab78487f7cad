"""Trains the demo model that ships in `models/demo_model/` (and is the default
model wherever none is named).

Data flow:
  1. Text: the opening paragraph of every standard-library docstring
     (`demo_corpus.collect_documents`), formatted as plain documents and a
     few one-turn chats (`demo_tokenizer.format_documents`).
  2. Tokenizer: a byte-level BPE trained on that text with `tokenizers`.
  3. Data: each epoch the documents are shuffled and packed into rows of
     `seq_len` tokens with positions and segment ids (no attention across
     documents, no padding).
  4. Model: a small Llama (GQA, tied embeddings) from `loong_jax.models.llama`,
     trained on next-token prediction with optax AdamW (linear warm-up, cosine
     decay, global-norm clipping); the train step is jitted and donates the
     parameters and optimizer state it replaces.
  5. Export: Hugging Face files (config.json, model.safetensors via
     `loading.save_hf_checkpoint`, tokenizer.json, tokenizer_config.json,
     generation_config.json), then greedy samples of a few prompts as a check.

Run: `python -m loong_jax.models.train_demo --out models/demo_model`
(also `loong-jax train-demo`). Seeded: the same machine gives the same files.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from loong_jax.models.config import ModelConfig
from loong_jax.models.demo_corpus import collect_documents, corpus_stats
from loong_jax.models.demo_tokenizer import (BOS, EOS, IM_END, PAD, PackedRows, encode_texts,
                                             format_documents, pack_stream, special_token_ids,
                                             tokenizer_files, train_tokenizer)
from loong_jax.models.generate import generate
from loong_jax.models.llama import LlamaForCausalLM, init_model
from loong_jax.models.loading import save_hf_checkpoint

SAMPLE_PROMPTS = ("Return the number of", "This module provides", "Create a new",
                  "If the file does not exist,")


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    max_paragraphs: int = 1
    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 704
    num_layers: int = 4
    num_heads: int = 8
    num_kv_heads: int = 2
    head_dim: int = 32
    max_position_embeddings: int = 8192
    seq_len: int = 256
    batch_size: int = 4
    steps: int = 1200
    peak_lr: float = 3e-3
    final_lr_fraction: float = 0.05
    warmup_steps: int = 60
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    seed: int = 0


# `--help` text of each setting (the flag is the field's name with dashes).
SETTING_HELP = {
    "max_paragraphs": "opening paragraphs kept of each docstring (the summary prose)",
    "vocab_size": "BPE vocabulary size",
    "hidden_size": "model width",
    "intermediate_size": "MLP width",
    "num_layers": "decoder layers",
    "num_heads": "attention (query) heads",
    "num_kv_heads": "key/value heads (grouped-query attention)",
    "head_dim": "width of one head",
    "max_position_embeddings": "context length the model is configured for",
    "seq_len": "tokens per packed training row",
    "batch_size": "rows of seq_len tokens per step",
    "steps": "AdamW steps",
    "peak_lr": "learning rate after the warm-up",
    "final_lr_fraction": "final learning rate as a fraction of the peak (cosine decay)",
    "warmup_steps": "steps of linear learning-rate warm-up",
    "weight_decay": "AdamW weight decay",
    "clip_norm": "global gradient-norm clipping",
    "seed": "seed of the initialisation and the data order",
}


def demo_config(settings: TrainSettings, special_ids: dict[str, int]) -> ModelConfig:
    return ModelConfig(
        model_type="llama",
        vocab_size=settings.vocab_size,
        hidden_size=settings.hidden_size,
        intermediate_size=settings.intermediate_size,
        num_layers=settings.num_layers,
        num_heads=settings.num_heads,
        num_kv_heads=settings.num_kv_heads,
        head_dim=settings.head_dim,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=settings.max_position_embeddings,
        tie_word_embeddings=True,
        dtype="float32",
        bos_token_id=special_ids[BOS],
        eos_token_ids=(special_ids[EOS], special_ids[IM_END]),
        pad_token_id=special_ids[PAD],
        scan_layers=False,  # one module a layer while training: the weight decay mask picks matrices by ndim
    )


def make_optimizer(settings: TrainSettings) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=settings.peak_lr, warmup_steps=settings.warmup_steps,
        decay_steps=settings.steps, end_value=settings.peak_lr * settings.final_lr_fraction)

    def decay_mask(params):  # weight decay on matrices only, not on norm scales
        return jax.tree.map(lambda p: p.ndim >= 2, params)

    return optax.chain(
        optax.clip_by_global_norm(settings.clip_norm),
        optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=settings.weight_decay, mask=decay_mask),
    )


def make_train_step(graphdef, rest, optimizer: optax.GradientTransformation):
    """A jitted step over a batch of packed rows; donates params and opt_state."""

    def loss_fn(params, batch):
        model = nnx.merge(graphdef, params, rest)

        def row_logits(tokens, positions, segment_ids):  # one packed row [seq_len]
            logits, _ = model(tokens, positions, segment_ids)
            return logits  # [seq_len, vocab] float32

        logits = jax.vmap(row_logits)(batch["tokens"], batch["positions"], batch["segment_ids"])
        token_loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
        mask = batch["loss_mask"]  # [batch, seq_len]
        return jnp.sum(token_loss * mask) / jnp.maximum(jnp.sum(mask), 1.0)

    @jax.jit(donate_argnames=("params", "opt_state"))
    def train_step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, loss, optax.tree.norm(grads)

    return train_step


def batches(token_lists: list[np.ndarray], settings: TrainSettings):
    """Endless stream of batches; every epoch is a new seeded shuffle."""
    epoch = 0
    while True:
        rows: PackedRows = pack_stream(token_lists, settings.seq_len,
                                       np.random.default_rng([settings.seed, epoch]))
        for start in range(0, rows.num_rows - settings.batch_size + 1, settings.batch_size):
            picked = slice(start, start + settings.batch_size)
            yield epoch, {field.name: getattr(rows, field.name)[picked]
                          for field in dataclasses.fields(rows)}
        epoch += 1


def train(model: LlamaForCausalLM, token_lists: list[np.ndarray], settings: TrainSettings,
          log_every: int = 10) -> dict[str, float]:
    """Trains `model` in place; returns summary figures."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    optimizer = make_optimizer(settings)
    opt_state = optimizer.init(params)
    train_step = make_train_step(graphdef, rest, optimizer)
    stream = batches(token_lists, settings)
    recent: list[float] = []
    start = time.perf_counter()
    progress = tqdm(range(settings.steps), desc="train", unit="step", mininterval=2.0)
    epoch = 0
    for step in progress:
        epoch, batch = next(stream)
        params, opt_state, loss, grad_norm = train_step(params, opt_state, batch)
        if step % log_every == 0 or step == settings.steps - 1:
            recent.append(float(loss))
            progress.set_postfix(loss=f"{float(loss):.3f}", gnorm=f"{float(grad_norm):.2f}",
                                 epoch=epoch)
    seconds = time.perf_counter() - start
    nnx.update(model, params)
    return {"seconds": seconds, "first_loss": recent[0], "final_loss": float(np.mean(recent[-5:])),
            "epochs": epoch + 1, "steps": settings.steps}


def export(model: LlamaForCausalLM, config: ModelConfig, tokenizer, out_dir: Path,
           settings: TrainSettings) -> None:
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    save_hf_checkpoint(model, config, out_dir)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    for name, content in tokenizer_files(tokenizer, settings.max_position_embeddings).items():
        (out_dir / name).write_text(json.dumps(content, indent=2) + "\n")


def folder_megabytes(path: Path) -> float:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file()) / 1e6


def parse_args(argv: list[str] | None) -> tuple[Path, TrainSettings]:
    defaults = TrainSettings()
    summary = " ".join(__doc__.split("\n\n")[0].split())  # the docstring's first paragraph, on one line
    parser = argparse.ArgumentParser(prog="loong-jax train-demo", description=summary,
                                     epilog="With the defaults: about 8 minutes on an idle 2-core CPU.")
    parser.add_argument("--out", type=Path, default=Path("models/demo_model"),
                        help="folder for the Hugging Face files (replaced)")
    for field in dataclasses.fields(TrainSettings):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(getattr(defaults, field.name)),
                            default=getattr(defaults, field.name),
                            help=f"{SETTING_HELP[field.name]} (default: %(default)s)")
    args = parser.parse_args(argv)
    settings = TrainSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainSettings)})
    if not 0 <= settings.warmup_steps < settings.steps:
        parser.error(f"--warmup-steps ({settings.warmup_steps}) must be below --steps ({settings.steps})")
    return args.out, settings


def main(argv: list[str] | None = None) -> int:
    out_dir, settings = parse_args(argv)
    documents = collect_documents(max_paragraphs=settings.max_paragraphs)
    print(f"corpus: {corpus_stats(documents)}")
    tokenizer = train_tokenizer(documents, settings.vocab_size)
    token_lists = encode_texts(tokenizer, format_documents(documents))
    total_tokens = sum(len(t) for t in token_lists)
    tokens_per_step = settings.batch_size * settings.seq_len
    print(f"tokens: {total_tokens}, {settings.steps * tokens_per_step / total_tokens:.1f} epochs "
          f"of {math.ceil(total_tokens / tokens_per_step)} steps")
    config = demo_config(settings, special_token_ids(tokenizer))
    model = init_model(config, seed=settings.seed)
    parameters = sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    print(f"model: {parameters} parameters, {settings}")
    summary = train(model, token_lists, settings)
    print(f"trained {summary['steps']} steps ({summary['epochs']} epochs) in "
          f"{summary['seconds']:.0f} s, final loss {summary['final_loss']:.3f}")
    export(model, config, tokenizer, out_dir, settings)
    print(f"wrote {out_dir} ({folder_megabytes(out_dir):.2f} MB)")
    for prompt in SAMPLE_PROMPTS:
        result = generate(model, tokenizer.encode(prompt).ids, 32, eos_token_ids=config.eos_token_ids)
        print(f"{prompt!r} -> {tokenizer.decode(result.tokens)!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
