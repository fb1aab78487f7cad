"""gRPC front end of loong_jax."""
