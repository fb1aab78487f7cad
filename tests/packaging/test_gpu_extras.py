"""The GPU extras: `pip install "loong-jax[cuda12]"` (and cuda13) must bring jax with its CUDA plugin.

Each extra names the jax extra of the same name, with the same version floor as the base dependency, and the
installed jax's own metadata must define that extra (else pip would install a CPU-only jax, silently).
"""

from __future__ import annotations

import importlib.metadata
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]
GPU_EXTRAS = ("cuda12", "cuda13")


def _project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _jax_requirement(lines: list[str]) -> Requirement:
    requirements = [Requirement(line) for line in lines]
    jax = [requirement for requirement in requirements if requirement.name == "jax"]
    assert len(jax) == 1, f"expected one jax requirement in {lines}"
    return jax[0]


@pytest.mark.parametrize("extra", GPU_EXTRAS)
def test_gpu_extra_brings_jax_with_the_cuda_plugin_of_the_same_name(extra):
    project = _project()
    extras = project["optional-dependencies"]
    assert extra in extras, f"pyproject.toml has no [{extra}] extra"
    gpu_jax = _jax_requirement(extras[extra])
    assert gpu_jax.extras == {extra}
    assert gpu_jax.specifier == _jax_requirement(project["dependencies"]).specifier


@pytest.mark.parametrize("extra", GPU_EXTRAS)
def test_installed_jax_defines_the_extra_with_its_cuda_plugin(extra):
    metadata = importlib.metadata.metadata("jax")
    assert extra in metadata.get_all("Provides-Extra")
    plugins = [Requirement(line) for line in metadata.get_all("Requires-Dist")]
    plugin_names = {requirement.name for requirement in plugins
                    if requirement.marker is not None and requirement.marker.evaluate({"extra": extra})}
    assert f"jax-{extra}-plugin" in plugin_names
