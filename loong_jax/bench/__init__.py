"""`loong-jax bench`: a load generator over gRPC (arrivals, datasets, runner, metrics, CLI)."""
