"""Llama-family models in Flax NNX, their configs, checkpoints and tokenizers."""
