"""Orbax save / restore of converted parameters, so a model loads back without its HF files.

Layout of a saved directory:
    <dir>/config.json   the model's config in Hugging Face form (`ModelConfig.to_hf_dict`)
    <dir>/params/       an Orbax `StandardCheckpointer` checkpoint of the `nnx.Param` state

Data flow:
  1. `save_params(model, dir)` writes config.json and the parameter state
     (exact bytes, dtype kept: bfloat16 stays bfloat16), in the model's
     layout (stacked layer weights by default, see `ModelConfig.scan_layers`).
  2. `restore_model(dir)` reads config.json, builds the abstract model (shapes
     only), restores the parameters straight into arrays of those shapes on
     the default device, recomputes the RoPE frequencies and fills the model.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from loong_jax.models.config import ConfigError, ModelConfig
from loong_jax.models.llama import LlamaForCausalLM, abstract_model
from loong_jax.models.rope import inverse_frequencies

PARAMS_SUBDIR = "params"
CONFIG_FILE = "config.json"


def save_params(model: LlamaForCausalLM, directory: str | Path) -> Path:
    """Writes <dir>/config.json and <dir>/params (replaces an older save in the same place)."""
    directory = Path(directory).absolute()  # Orbax requires absolute paths
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).write_text(json.dumps(model.config.to_hf_dict(), indent=2) + "\n")
    params = nnx.state(model, nnx.Param)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(directory / PARAMS_SUBDIR, params, force=True)
        checkpointer.wait_until_finished()
    return directory


def restore_model(directory: str | Path, scan_layers: bool = True) -> tuple[LlamaForCausalLM, ModelConfig]:
    """The model saved by `save_params`, with its config. The parameters are stored in the model's own
    layout, so `scan_layers` must be the `ModelConfig.scan_layers` of the model that was saved."""
    directory = Path(directory).absolute()
    if not (directory / PARAMS_SUBDIR).is_dir():
        raise ConfigError(f"no Orbax parameters at {directory / PARAMS_SUBDIR} (save_params writes them)")
    config = ModelConfig.from_json(directory / CONFIG_FILE).with_scan_layers(scan_layers)
    model = abstract_model(config)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device),
                          nnx.state(model, nnx.Param))
    with ocp.StandardCheckpointer() as checkpointer:
        params = checkpointer.restore(directory / PARAMS_SUBDIR, target)
    nnx.update(model, params)
    model.inv_freq.set_value(jnp.asarray(inverse_frequencies(config)))  # [head_dim / 2]
    return model, config
