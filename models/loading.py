"""Hugging Face checkpoints (config.json + safetensors) <-> `LlamaForCausalLM`.

Data flow of `load_hf_checkpoint(dir, dtype)`:
  1. `ModelConfig.from_json` reads config.json (one-line `ConfigError` for a
     missing file or an unsupported model_type / rope type).
  2. `abstract_model(config)` gives every parameter's path, shape and dtype
     without allocating anything; `hf_names.hf_name` maps each path to its
     Hugging Face tensor name.
  3. The safetensors headers are checked against that list *before* any
     weight is read: a missing tensor, an unexpected tensor or a wrong shape
     is one `CheckpointError` line naming the tensor.
  4. Each tensor is memory-mapped, transposed if it is a linear weight,
     cast to the config dtype and placed on device; the RoPE frequencies are
     recomputed from the config; `nnx.update` fills the abstract model.

`save_hf_checkpoint(model, config, dir)` is the inverse (config.json +
model.safetensors), readable by `transformers.AutoModelForCausalLM`.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from loong_jax.models import hf_names
from loong_jax.models.config import ModelConfig
from loong_jax.models.llama import LlamaForCausalLM, abstract_model
from loong_jax.models.rope import inverse_frequencies
from loong_jax.models.safetensors_io import (SINGLE_FILE, SafetensorsError, TensorEntry,
                                             index_safetensors, read_tensor, write_safetensors)


class CheckpointError(ValueError):
    """A checkpoint that does not fit its config.json; the message names the tensor."""


def _shape_text(shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def expected_tensors(model: LlamaForCausalLM) -> dict[str, tuple[tuple, bool, tuple[int, ...]]]:
    """HF name -> (NNX path, transpose?, HF-layout shape) for every parameter of `model`."""
    expected = {}
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name, transpose = hf_names.hf_name(path)
        shape = tuple(variable.get_value().shape)
        expected[name] = (path, transpose, shape[::-1] if transpose else shape)
    return expected


def check_tensors(expected: dict[str, tuple[tuple, bool, tuple[int, ...]]],
                  found: dict[str, TensorEntry], config: ModelConfig, where: Path) -> None:
    """Raises one CheckpointError line for the first missing, unexpected or misshapen tensor."""
    for name, (_, _, shape) in expected.items():
        if name not in found:
            raise CheckpointError(f"checkpoint {where} is missing tensor {name!r} "
                                  f"(expected shape {_shape_text(shape)})")
    for name in found:
        if name not in expected and not hf_names.is_ignorable(name, config.tie_word_embeddings):
            raise CheckpointError(f"checkpoint {where} has unexpected tensor {name!r} "
                                  f"(not part of a {config.model_type} model as its config.json describes)")
    for name, (_, _, shape) in expected.items():
        if found[name].shape != shape:
            raise CheckpointError(f"tensor {name!r} in {where} has shape {_shape_text(found[name].shape)}, "
                                  f"expected {_shape_text(shape)} from config.json")


def load_hf_checkpoint(path: str | Path, dtype: str | None = None) -> tuple[LlamaForCausalLM, ModelConfig]:
    """Loads a Hugging Face Llama/Mistral/Qwen2 checkpoint directory.

    dtype: "float32" or "bfloat16" to override config.json's dtype.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    config = ModelConfig.from_json(path)
    if dtype is not None:
        config = config.with_dtype(str(jnp.dtype(dtype)))
    try:
        found = index_safetensors(path)
    except SafetensorsError as err:
        raise CheckpointError(str(err)) from None

    model = abstract_model(config)
    expected = expected_tensors(model)
    check_tensors(expected, found, config, path)

    target_dtype = config.jnp_dtype
    values = {}
    for name, (param_path, transpose, _) in expected.items():
        array = read_tensor(found[name])  # [HF layout], memory-mapped
        if transpose:
            array = array.T
        values[param_path] = jnp.asarray(np.asarray(array).astype(target_dtype, copy=False))
    values[("inv_freq",)] = jnp.asarray(inverse_frequencies(config))  # [head_dim / 2]
    nnx.update(model, nnx.from_flat_state(values))
    return model, config


def hf_tensors(model: LlamaForCausalLM) -> dict[str, np.ndarray]:
    """The model's parameters as Hugging Face named numpy arrays (HF layout)."""
    tensors = {}
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name, transpose = hf_names.hf_name(path)
        array = np.asarray(variable.get_value())
        tensors[name] = array.T if transpose else array
    return tensors


def save_hf_checkpoint(model: LlamaForCausalLM, config: ModelConfig, path: str | Path) -> Path:
    """Writes config.json + model.safetensors (tied embeddings stored once)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2) + "\n")
    write_safetensors(path / SINGLE_FILE, hf_tensors(model))
    return path
