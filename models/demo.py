"""Where the shipped demo model lives: the default model of loong_jax.

Data flow:
  1. `DEMO_MODEL_DIR` is the `demo_model/` folder installed with the
     `loong_jax.models` package (package data), found through
     `importlib.resources`, so it works from a source checkout, an editable
     install and a wheel alike.
  2. `resolve_model_path(name)` turns what a user typed (nothing, "demo", or a
     folder) into a folder of Hugging Face files, and fails with one line when
     the folder does not exist.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

DEMO_MODEL_NAME = "demo"
DEMO_MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                    "generation_config.json")


def _demo_model_dir() -> Path:
    # The package is always a plain folder on disk (never zipped), so the
    # resource path is a real path that stays valid after the call.
    return Path(str(importlib.resources.files("loong_jax.models") / "demo_model"))


DEMO_MODEL_DIR: Path = _demo_model_dir()


def resolve_model_path(model: str | Path | None = None) -> Path:
    """The checkpoint folder for `model`; None or "demo" means the demo model."""
    if model is None or str(model) == DEMO_MODEL_NAME:
        path = DEMO_MODEL_DIR
    else:
        path = Path(model).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"model folder not found: {path}")
    return path
