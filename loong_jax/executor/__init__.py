"""Executors run a plan: the JAX executor on devices (programs, their inputs, the program cache)."""
