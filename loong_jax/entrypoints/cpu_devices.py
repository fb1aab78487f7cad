"""Simulated CPU devices: run on N CPU devices of one host (what `--cpu-devices N` and `LLM(cpu_devices=N)` do).

Data flow:
  1. `use_cpu_devices(count)` is called before anything asks JAX for its devices (`profile`, `generate`,
     `serve` and `LLM` call it first). JAX creates its backends once per process, at the first device query
     or operation; until then `jax_platforms` and `jax_num_cpu_devices` can still be set, so it selects the
     CPU platform with `count` devices.
     Over several processes (`loong_jax.distributed`) the count is each process's own.
  2. Once the backends exist the setting can no longer change: if the devices are already `count` CPU
     devices nothing happens (tests, a second `LLM` in the same process); otherwise a ValueError says what
     JAX started with and that the count must be chosen before JAX's first use.
"""

from __future__ import annotations


def _backends_started() -> bool:
    # JAX has no public query for this; its xla_bridge keeps the answer (present since JAX 0.4).
    from jax._src import xla_bridge

    return xla_bridge.backends_are_initialized()


def use_cpu_devices(count: int | None) -> None:
    """Run on `count` simulated CPU devices (None: leave JAX's devices alone)."""
    if count is None:
        return
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"cpu_devices must be a positive integer, got {count!r}")
    import jax

    if _backends_started():
        devices = jax.local_devices()  # this process's (over several processes jax.devices() is the cluster's)
        platform = devices[0].platform
        if platform != "cpu" or len(devices) != count:
            raise ValueError(f"cpu_devices={count}: JAX already started with {len(devices)} {platform} device(s) "
                             f"in this process; the device count must be set before JAX's first use "
                             f"(start a new process, or create the LLM before any other JAX call)")
        return
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", count)
