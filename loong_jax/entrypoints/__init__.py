"""What users call: `LLM`, `AsyncLLM`, the `loong-jax` command line, batch evaluation and profiling."""
