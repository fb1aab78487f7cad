"""loong_jax: serving long-context language models with elastic sequence parallelism."""

__version__ = "0.1.0"
