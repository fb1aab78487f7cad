"""Hugging Face checkpoints (config.json + safetensors) <-> `LlamaForCausalLM`.

Data flow of `load_hf_checkpoint(dir, dtype)`:
  1. `ModelConfig.from_json` reads config.json (one-line `ConfigError` for a
     missing file or an unsupported model_type / rope type).
  2. `abstract_model(config)` gives every parameter's path, shape and dtype
     without allocating anything; `hf_names.hf_name` maps each path (and
     layer, for stacked layer weights) to its Hugging Face tensor name.
  3. The safetensors headers are checked against that list *before* any
     weight is read: a missing tensor, an unexpected tensor or a wrong shape
     is one `CheckpointError` line naming the tensor.
  4. Each tensor is memory-mapped, transposed if it is a linear weight,
     cast to the config dtype, stacked with the other layers' tensors of
     the same kind when the model stacks its layers (`scan_layers`), and
     placed on device; the RoPE frequencies are
     recomputed from the config; `nnx.update` fills the abstract model.

`save_hf_checkpoint(model, config, dir)` is the inverse (config.json +
model.safetensors), readable by `transformers.AutoModelForCausalLM`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from flax import nnx

from loong_jax.models import hf_names
from loong_jax.models.config import ModelConfig
from loong_jax.models.llama import LlamaForCausalLM, abstract_model, is_stacked
from loong_jax.models.rope import inverse_frequencies
from loong_jax.models.safetensors_io import (SINGLE_FILE, SafetensorsError, TensorEntry,
                                             index_safetensors, read_tensor, write_safetensors)


class CheckpointError(ValueError):
    """A checkpoint that does not fit its config.json; the message names the tensor."""


def _shape_text(shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


class ExpectedTensor(NamedTuple):
    """Where a Hugging Face tensor goes: the NNX path, the layer of a stacked leaf (None: the whole leaf),
    whether it is transposed, and its shape in the Hugging Face layout."""

    path: tuple
    layer: int | None
    transpose: bool
    shape: tuple[int, ...]


def expected_tensors(model: LlamaForCausalLM) -> dict[str, ExpectedTensor]:
    """HF name -> `ExpectedTensor` for every parameter of `model` (a stacked layer leaf gives one per layer)."""
    expected = {}
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        shape = tuple(variable.get_value().shape)
        layers = range(shape[0]) if is_stacked(path) else (None,)
        for layer in layers:
            name, transpose = hf_names.hf_name(path, layer)
            leaf_shape = shape if layer is None else shape[1:]
            expected[name] = ExpectedTensor(path, layer, transpose, leaf_shape[::-1] if transpose else leaf_shape)
    return expected


def check_tensors(expected: dict[str, ExpectedTensor], found: dict[str, TensorEntry], config: ModelConfig,
                  where: Path) -> None:
    """Raises one CheckpointError line for the first missing, unexpected or misshapen tensor."""
    for name, tensor in expected.items():
        if name not in found:
            raise CheckpointError(f"checkpoint {where} is missing tensor {name!r} "
                                  f"(expected shape {_shape_text(tensor.shape)})")
    for name in found:
        if name not in expected and not hf_names.is_ignorable(name, config.tie_word_embeddings):
            raise CheckpointError(f"checkpoint {where} has unexpected tensor {name!r} "
                                  f"(not part of a {config.model_type} model as its config.json describes)")
    for name, tensor in expected.items():
        if found[name].shape != tensor.shape:
            raise CheckpointError(f"tensor {name!r} in {where} has shape {_shape_text(found[name].shape)}, "
                                  f"expected {_shape_text(tensor.shape)} from config.json")


def _read_leaves(expected: dict[str, ExpectedTensor], found: dict[str, TensorEntry], dtype):
    """(NNX path, host array in the NNX layout and `dtype`) per leaf; a stacked leaf's layers are read,
    transposed and stacked one leaf at a time, so host memory holds at most one stacked leaf extra."""
    names_by_path: dict[tuple, list[str]] = {}
    for name, tensor in expected.items():  # a stacked leaf's layers come in layer order
        names_by_path.setdefault(tensor.path, []).append(name)
    for param_path, names in names_by_path.items():
        arrays = []
        for name in names:
            array = read_tensor(found[name])  # [HF layout], memory-mapped
            arrays.append(np.asarray(array.T if expected[name].transpose else array).astype(dtype, copy=False))
        yield param_path, (np.stack(arrays) if is_stacked(param_path) else arrays[0])  # [layers, ...] if stacked


def load_hf_checkpoint(path: str | Path, dtype: str | None = None,
                       scan_layers: bool = True) -> tuple[LlamaForCausalLM, ModelConfig]:
    """Loads a Hugging Face Llama/Mistral/Qwen2 checkpoint directory.

    dtype: "float32" or "bfloat16" to override config.json's dtype;
    scan_layers: `ModelConfig.scan_layers` of the model built (stacked layer weights or one module a layer).
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    config = ModelConfig.from_json(path).with_scan_layers(scan_layers)
    if dtype is not None:
        config = config.with_dtype(str(jnp.dtype(dtype)))
    try:
        found = index_safetensors(path)
    except SafetensorsError as err:
        raise CheckpointError(str(err)) from None

    model = abstract_model(config)
    expected = expected_tensors(model)
    check_tensors(expected, found, config, path)

    values = {param_path: jnp.asarray(array)
              for param_path, array in _read_leaves(expected, found, config.jnp_dtype)}
    values[("inv_freq",)] = jnp.asarray(inverse_frequencies(config))  # [head_dim / 2]
    nnx.update(model, nnx.from_flat_state(values))
    return model, config


def hf_tensors(model: LlamaForCausalLM) -> dict[str, np.ndarray]:
    """The model's parameters as Hugging Face named numpy arrays (HF layout; stacked layers unstacked)."""
    tensors = {}
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        array = np.asarray(variable.get_value())
        for layer, leaf in (enumerate(array) if is_stacked(path) else [(None, array)]):
            name, transpose = hf_names.hf_name(path, layer)
            tensors[name] = leaf.T if transpose else leaf
    return tensors


def save_hf_checkpoint(model: LlamaForCausalLM, config: ModelConfig, path: str | Path) -> Path:
    """Writes config.json + model.safetensors (tied embeddings stored once)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2) + "\n")
    write_safetensors(path / SINGLE_FILE, hf_tensors(model))
    return path
