"""Orbax save / restore of converted parameters: bit-identical, config kept, no HF files needed."""

from __future__ import annotations

import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from loong_jax.models.checkpoint import restore_model, save_params
from loong_jax.models.config import ConfigError
from loong_jax.models.loading import load_hf_checkpoint
from tests.models.tiny_hf import build_hf_model, save_hf_model


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    return save_hf_model(build_hf_model("qwen2_bias", seed=5), tmp_path_factory.mktemp("qwen2"))


def _state_bytes(model) -> dict:
    """Every variable (params and the RoPE frequencies) as raw bytes, dtype and shape."""
    out = {}
    for path, variable in nnx.to_flat_state(nnx.state(model)):
        array = np.asarray(variable.get_value())
        out[path] = (array.dtype, array.shape, array.tobytes())
    return out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip_is_bit_identical_without_hf_files(hf_checkpoint, tmp_path, dtype):
    source = tmp_path / "hf"
    shutil.copytree(hf_checkpoint, source)
    model, config = load_hf_checkpoint(source, dtype=dtype)
    saved = save_params(model, tmp_path / "orbax")
    shutil.rmtree(source)  # the restored model must not need the Hugging Face files

    restored, restored_config = restore_model(saved)
    assert restored_config == config
    original_state, restored_state = _state_bytes(model), _state_bytes(restored)
    assert original_state.keys() == restored_state.keys()
    for path, (dtype_, shape, raw) in original_state.items():
        assert restored_state[path] == (dtype_, shape, raw), path
    assert restored_state[("layers", "self_attn", "q_proj", "bias")][0] == jnp.dtype(dtype)
    assert restored_config.dtype == dtype
    assert hasattr(restored, "lm_head") != config.tie_word_embeddings



def test_unrolled_layers_round_trip(hf_checkpoint, tmp_path):
    """A model with one module a layer (`scan_layers=False`) restores in that layout, bit-identical."""
    model, config = load_hf_checkpoint(hf_checkpoint, scan_layers=False)
    restored, restored_config = restore_model(save_params(model, tmp_path), scan_layers=False)
    assert restored_config == config and not restored_config.scan_layers
    assert _state_bytes(restored) == _state_bytes(model)


def test_saving_twice_overwrites(hf_checkpoint, tmp_path):
    model, _ = load_hf_checkpoint(hf_checkpoint)
    save_params(model, tmp_path)
    save_params(model, tmp_path)
    restored, _ = restore_model(tmp_path)
    assert _state_bytes(restored) == _state_bytes(model)


def test_restore_from_empty_directory_is_one_clear_line(tmp_path):
    with pytest.raises(ConfigError) as caught:
        restore_model(tmp_path)
    assert "no Orbax parameters" in str(caught.value) and "\n" not in str(caught.value)
