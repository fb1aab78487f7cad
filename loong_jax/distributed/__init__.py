"""Serving over several processes on JAX's multi-controller runtime (`jax.distributed`).

Process 0 (the leader) runs the scheduler, the server, health and metrics; every step its executor
publishes the plan and its inputs (`channel`, over JAX's coordination service), and every process runs,
in the plan's order, the units whose groups include its devices (`follower`). Rooms: `launch` (options,
joining the cluster), `wire` (the step's bytes), `channel` (plans down, outputs up), `follower` (the loop).
"""
