"""Python stubs of `server/proto/loong_jax/v1/generation.proto`, made by `regenerate_stubs.py`.

Regenerate after editing the proto: `python -m loong_jax.server.regenerate_stubs`.
"""
