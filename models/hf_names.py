"""The one table between Hugging Face tensor names and NNX parameter paths.

Data flow:
  1. The model's parameter paths already mirror Hugging Face module names
     (`layers/0/self_attn/q_proj/kernel`), so a name is the path joined by
     dots under `model.` (except `lm_head`), with the Flax leaf name swapped
     for the torch one (kernel / embedding / scale -> weight).
  2. torch `nn.Linear` stores weight as [out, in]; Flax `kernel` is [in, out],
     so linear weights are transposed on the way in and out. Embedding and
     norm weights keep their layout.
  3. Tensors that transformers may write but loong_jax derives itself
     (rotary `inv_freq` buffers, a tied `lm_head.weight`) are ignorable.
  4. Stacked layer weights (`ModelConfig.scan_layers`: path
     `layers/mlp/up_proj/kernel`, [layers, ...]) are one leaf for as many
     Hugging Face tensors as layers: `hf_name(path, layer)` names layer
     `layer`'s slice.
"""

from __future__ import annotations

from typing import Any

from loong_jax.models.llama import is_stacked

# Flax leaf name -> (torch leaf name, transpose?)
_LEAF_TO_HF = {
    "kernel": ("weight", True),
    "embedding": ("weight", False),
    "scale": ("weight", False),
    "bias": ("bias", False),
}

TIED_LM_HEAD = "lm_head.weight"


def hf_name(path: tuple[Any, ...], layer: int | None = None) -> tuple[str, bool]:
    """NNX parameter path (and, for a stacked layer leaf, the layer) -> (Hugging Face tensor name,
    whether to transpose).

    ('layers', 3, 'mlp', 'up_proj', 'kernel') -> ('model.layers.3.mlp.up_proj.weight', True)
    ('layers', 'mlp', 'up_proj', 'kernel'), layer 3 -> the same
    """
    if is_stacked(path) != (layer is not None):
        raise ValueError(f"{path}: a layer is given exactly for stacked layer weights, got layer={layer}")
    if layer is not None:
        path = (path[0], layer, *path[1:])
    *modules, leaf = (str(part) for part in path)
    torch_leaf, transpose = _LEAF_TO_HF[leaf]
    prefix = [] if modules[0] == "lm_head" else ["model"]
    return ".".join(prefix + modules + [torch_leaf]), transpose


def is_ignorable(name: str, tie_word_embeddings: bool) -> bool:
    """True for tensors a checkpoint may carry that loong_jax recomputes or shares."""
    if name.endswith("rotary_emb.inv_freq"):
        return True
    return tie_word_embeddings and name == TIED_LM_HEAD
