"""Safetensors loading: sharded files, bfloat16, saving back, and one-line errors for bad checkpoints."""

from __future__ import annotations

import copy
import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from loong_jax.models.config import ConfigError
from loong_jax.models.loading import CheckpointError, hf_tensors, load_hf_checkpoint, save_hf_checkpoint
from loong_jax.models.safetensors_io import index_safetensors, read_tensor, write_safetensors
from loong_jax.models.tokenizer import Tokenizer, TokenizerError
from tests.models.tiny_hf import build_hf_model, hf_logits, save_hf_model

PROMPT = np.random.default_rng(7).integers(0, 128, size=48).astype(np.int32)


@pytest.fixture(scope="module")
def hf_model():
    return build_hf_model("llama_gqa", seed=3)


@pytest.fixture(scope="module")
def checkpoint_dir(hf_model, tmp_path_factory):
    return save_hf_model(hf_model, tmp_path_factory.mktemp("single"))


@pytest.fixture(scope="module")
def loaded(checkpoint_dir):
    return load_hf_checkpoint(checkpoint_dir)


def _logits(model, tokens=PROMPT) -> np.ndarray:
    n = len(tokens)
    logits, _ = nnx.jit(lambda m, t: m(t, jnp.arange(n, dtype=jnp.int32), jnp.zeros((n,), jnp.int32)))(
        model, jnp.asarray(tokens))
    return np.asarray(logits)


def _params(model) -> dict:
    return {path: np.asarray(v.get_value()) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_sharded_checkpoint_loads_identically(hf_model, loaded, tmp_path):
    save_hf_model(hf_model, tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 3
    sharded_model, sharded_config = load_hf_checkpoint(tmp_path)
    model, config = loaded
    assert sharded_config == config
    single, sharded = _params(model), _params(sharded_model)
    assert single.keys() == sharded.keys()
    for path in single:
        np.testing.assert_array_equal(sharded[path], single[path], err_msg=str(path))
    np.testing.assert_allclose(_logits(sharded_model), hf_logits(hf_model, PROMPT).numpy(), rtol=0, atol=1e-4)


def test_bfloat16_load_is_close_to_float32(hf_model, checkpoint_dir, loaded):
    model_bf16, config_bf16 = load_hf_checkpoint(checkpoint_dir, dtype="bfloat16")
    assert config_bf16.dtype == "bfloat16"
    assert all(a.dtype == jnp.bfloat16 for a in _params(model_bf16).values())
    reference = _logits(loaded[0])
    logits_bf16 = _logits(model_bf16)
    assert logits_bf16.dtype == np.float32
    # transformers in bfloat16 on the same weights sets the yardstick for rounding error
    hf_bf16 = hf_logits(copy.deepcopy(hf_model).to(torch.bfloat16), PROMPT).numpy()
    hf_error = np.abs(hf_bf16 - reference).mean()
    our_error = np.abs(logits_bf16 - reference).mean()
    assert 0 < our_error <= 1.5 * hf_error
    assert np.abs(logits_bf16 - reference).max() <= 0.1 * np.abs(reference).max()
    assert np.mean(logits_bf16.argmax(-1) == reference.argmax(-1)) >= 0.9


def test_bfloat16_checkpoint_round_trips_through_transformers(loaded, tmp_path):
    model, config = loaded
    model_bf16, config_bf16 = load_hf_checkpoint(save_hf_checkpoint(model, config, tmp_path / "f32"),
                                                 dtype="bfloat16")
    path = save_hf_checkpoint(model_bf16, config_bf16, tmp_path / "bf16")
    assert {e.dtype.name for e in index_safetensors(path).values()} == {"bfloat16"}
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(path)
    assert reloaded.dtype == torch.bfloat16
    ours = _params(model_bf16)
    theirs = dict(reloaded.named_parameters())
    np.testing.assert_array_equal(
        theirs["model.layers.1.self_attn.k_proj.weight"].detach().float().numpy(),
        ours[("layers", "self_attn", "k_proj", "kernel")][1].astype(np.float32).T)


def test_unrolled_layers_load_the_same_weights_and_logits(checkpoint_dir, loaded):
    """`scan_layers=False` keeps one module a layer: the same weights as the stacked leaves' slices, the same
    logits, and the same Hugging Face tensors written back."""
    model, config = loaded
    unrolled, unrolled_config = load_hf_checkpoint(checkpoint_dir, scan_layers=False)
    assert config.scan_layers and unrolled_config == config.with_scan_layers(False)
    stacked, per_layer = _params(model), _params(unrolled)
    assert len(per_layer) == len(stacked) + (config.num_layers - 1) * sum(p[0] == "layers" for p in stacked)
    for path, array in per_layer.items():
        if path[0] == "layers":  # ('layers', i, ...) is slice i of ('layers', ...)
            np.testing.assert_array_equal(stacked[("layers", *path[2:])][path[1]], array, err_msg=str(path))
        else:
            np.testing.assert_array_equal(stacked[path], array, err_msg=str(path))
    np.testing.assert_allclose(_logits(unrolled), _logits(model), rtol=0, atol=1e-5)
    ours, theirs = hf_tensors(model), hf_tensors(unrolled)
    assert ours.keys() == theirs.keys()
    for name in ours:
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)


def test_saved_checkpoint_loads_in_transformers(loaded, tmp_path):
    model, config = loaded
    path = save_hf_checkpoint(model, config, tmp_path)
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    assert isinstance(reloaded, transformers.LlamaForCausalLM)
    np.testing.assert_allclose(hf_logits(reloaded, PROMPT).numpy(), _logits(model), rtol=0, atol=1e-4)
    model_again, config_again = load_hf_checkpoint(path)
    assert config_again == config


def test_tied_checkpoint_ignores_a_stored_lm_head(tmp_path):
    hf_model = build_hf_model("tied_bias", seed=1)
    path = save_hf_model(hf_model, tmp_path)
    tensors = {name: np.array(read_tensor(e)) for name, e in index_safetensors(path).items()}
    assert "lm_head.weight" not in tensors
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(8, np.float32)  # older checkpoints
    write_safetensors(path / "model.safetensors", tensors)
    model, config = load_hf_checkpoint(path)
    assert config.tie_word_embeddings and not hasattr(model, "lm_head")
    np.testing.assert_allclose(_logits(model), hf_logits(hf_model, PROMPT).numpy(), rtol=0, atol=1e-4)


# ----------------------------------------------------------------------------- bad checkpoints
def _broken_copy(checkpoint_dir, tmp_path, edit_tensors=None, edit_config=None):
    path = tmp_path / "broken"
    shutil.copytree(checkpoint_dir, path)
    if edit_tensors is not None:
        tensors = {name: np.array(read_tensor(e)) for name, e in index_safetensors(path).items()}
        edit_tensors(tensors)
        write_safetensors(path / "model.safetensors", tensors)
    if edit_config is not None:
        config = json.loads((path / "config.json").read_text())
        edit_config(config)
        (path / "config.json").write_text(json.dumps(config))
    return path


def _one_line_error(error_type, path, *, loader=load_hf_checkpoint) -> str:
    with pytest.raises(error_type) as caught:
        loader(path)
    message = str(caught.value)
    assert "\n" not in message
    assert isinstance(caught.value, ValueError)
    return message


def test_missing_tensor_is_named(checkpoint_dir, tmp_path):
    path = _broken_copy(checkpoint_dir, tmp_path,
                        edit_tensors=lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    message = _one_line_error(CheckpointError, path)
    assert "missing tensor 'model.layers.1.mlp.up_proj.weight'" in message
    assert "[128, 64]" in message


def test_wrong_shape_is_named_with_both_shapes(checkpoint_dir, tmp_path):
    def shrink(tensors):
        tensors["model.layers.0.self_attn.k_proj.weight"] = tensors["model.layers.0.self_attn.k_proj.weight"][:16]
    message = _one_line_error(CheckpointError, _broken_copy(checkpoint_dir, tmp_path, edit_tensors=shrink))
    assert "'model.layers.0.self_attn.k_proj.weight'" in message
    assert "shape [16, 64], expected [32, 64]" in message


def test_unexpected_tensor_is_named(checkpoint_dir, tmp_path):
    def add(tensors):
        tensors["model.layers.0.self_attn.q_norm.weight"] = np.ones(16, np.float32)
    message = _one_line_error(CheckpointError, _broken_copy(checkpoint_dir, tmp_path, edit_tensors=add))
    assert "unexpected tensor 'model.layers.0.self_attn.q_norm.weight'" in message


def test_untied_config_without_lm_head_is_a_missing_tensor(checkpoint_dir, tmp_path):
    path = _broken_copy(checkpoint_dir, tmp_path, edit_tensors=lambda t: t.pop("lm_head.weight"))
    assert "missing tensor 'lm_head.weight'" in _one_line_error(CheckpointError, path)


def test_unknown_model_type_is_named(checkpoint_dir, tmp_path):
    path = _broken_copy(checkpoint_dir, tmp_path, edit_config=lambda c: c.update(model_type="gpt2"))
    message = _one_line_error(ConfigError, path)
    assert "unsupported model_type 'gpt2'" in message and "llama" in message


def test_unknown_rope_type_is_named(checkpoint_dir, tmp_path):
    def yarn(config):
        config["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    message = _one_line_error(ConfigError, _broken_copy(checkpoint_dir, tmp_path, edit_config=yarn))
    assert "unsupported rope_scaling type 'yarn'" in message


def test_missing_config_is_named(checkpoint_dir, tmp_path):
    path = _broken_copy(checkpoint_dir, tmp_path)
    (path / "config.json").unlink()
    assert "missing config.json" in _one_line_error(ConfigError, path)


def test_missing_weights_are_named(checkpoint_dir, tmp_path):
    path = _broken_copy(checkpoint_dir, tmp_path)
    (path / "model.safetensors").unlink()
    message = _one_line_error(CheckpointError, path)
    assert "missing weights" in message and "model.safetensors" in message


def test_missing_shard_is_named(hf_model, tmp_path):
    path = save_hf_model(hf_model, tmp_path, max_shard_size="40KB")
    shard = sorted(path.glob("model-*-of-*.safetensors"))[1]
    shard.unlink()
    assert f"missing weights shard {shard.name}" in _one_line_error(CheckpointError, path)


def test_missing_directory_is_named(tmp_path):
    assert "does not exist" in _one_line_error(CheckpointError, tmp_path / "nowhere")


def test_missing_tokenizer_is_named(checkpoint_dir):
    message = _one_line_error(TokenizerError, checkpoint_dir, loader=Tokenizer.from_dir)
    assert "missing tokenizer" in message and "tokenizer.json" in message
