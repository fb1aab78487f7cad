"""Tiny Hugging Face checkpoints built with `transformers` for the model tests.

Each family is a small config (2 layers, hidden 64, GQA 4:2 heads, vocab 128)
whose weights are drawn with a large initializer and whose norm weights and
biases are randomised too (transformers initialises them to 1 and 0, which
would hide a norm or bias that is loaded wrongly). EOS/BOS ids are left out
so `generate` runs to max_new_tokens on both sides.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              initializer_range=0.3, rms_norm_eps=1e-5, bos_token_id=None, eos_token_id=None,
              pad_token_id=None)

# family name -> (config class, model class, extra config fields)
FAMILIES = {
    "llama_gqa": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    "llama3_rope": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(
        rope_theta=500000.0,
        # original context 64 puts one frequency pair in each band (high / medium / low)
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=64))),
    "linear_rope": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(
        rope_scaling=dict(rope_type="linear", factor=2.0))),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, dict(sliding_window=4096)),
    "qwen2_bias": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),
    "tied_bias": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(
        tie_word_embeddings=True, attention_bias=True, mlp_bias=True)),
}


def build_hf_model(family: str, seed: int = 0) -> transformers.PreTrainedModel:
    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**COMMON, **extra)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.3 * torch.randn_like(param))
            elif name.endswith(".bias"):
                param.copy_(0.3 * torch.randn_like(param))
    return model


def save_hf_model(model: transformers.PreTrainedModel, path: Path, **save_kwargs) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, **save_kwargs)
    return path


def hf_logits(model: transformers.PreTrainedModel, token_ids) -> "torch.Tensor":
    """[T, vocab] float32 logits of one sequence."""
    with torch.no_grad():
        return model(torch.tensor([list(token_ids)])).logits[0].float()


def hf_greedy(model: transformers.PreTrainedModel, prompt_ids, max_new_tokens: int) -> list[int]:
    input_ids = torch.tensor([list(prompt_ids)])
    # An explicit mask: without one, transformers masks every prompt token equal to pad_token_id.
    out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                         max_new_tokens=max_new_tokens, pad_token_id=0)
    return out[0, input_ids.shape[1]:].tolist()
