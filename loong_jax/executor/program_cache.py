"""Compiled programs of the engine, keyed by (kind, group, shape bucket).

Every program the executor runs (a prefill, a decode step or a migration on one group of instances) has
static shapes, so each distinct key is one XLA compilation. Keeping the family of keys small (aligned
power-of-two groups, power-of-two token and batch buckets) bounds how many there are.

Data flow:
  1. The executor names a program by a `ProgramKey` and gives the cache a `lower(key)` function that returns
     `jax.jit(...).lower(...)` of that program on abstract, sharded inputs (nothing runs).
  2. Start-up: `warm_up(keys)` compiles the common programs ahead of time (`lower(key).compile()`) with a
     progress bar (on a terminal only) that names each program readably (`ProgramKey.describe()`, e.g.
     "prefill d=8 (0-7) rows<=16 requests<=8 greedy"), so the first requests do not wait for XLA.
  3. Running: `get(key)` returns a compiled program (a hit), waits for one already compiling, or compiles it
     now (a miss). `request(key)` compiles in a background thread (programs the executor expects to need
     soon, or units waiting for their program while the other groups keep running).
  4. `ready_keys()` is the set of compiled keys: what the scheduler's view calls `ready_programs`.
  5. `enable_persistent_cache(dir)` turns on JAX's persistent compilation cache, so a restarted engine
     loads its programs from disk instead of compiling them again.
Statistics (`stats`): compilations, hits, compile seconds, background compilations.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import jax

from loong_jax.sampling.batch import SamplingSignature

logger = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = Path(os.environ.get("LOONG_JAX_CACHE_DIR", Path.home() / ".cache" / "loong_jax" / "jax_cache"))


# What each kind's bucket tuple holds, in order (`unit_inputs` builds them, `programs.abstract_inputs` reads
# them); "sampling" is the `sampling.batch.SamplingSignature` (history widths, logprobs columns, plain greedy).
BUCKET_FIELDS = {
    "prefill": ("rows", "requests", "sampling"),  # rows per member, requests in the unit
    "prefill_context": ("rows", "requests", "pages", "sampling"),  # + KV pages of earlier chunks
    "decode": ("batch", "pages", "sampling"),  # requests per master, pages per member
    "migrate": ("slots",),  # token slots moved
}


@dataclasses.dataclass(frozen=True)
class ProgramKey:
    """One compiled program: `kind` is "prefill", "prefill_context", "decode" or "migrate"; `group` the
    ordered instances it runs on; `bucket` its static shapes (kind-specific tuple, see BUCKET_FIELDS)."""

    kind: str
    group: tuple[int, ...]
    bucket: tuple

    def __str__(self) -> str:
        """The exact key (logs, debugging)."""
        return f"{self.kind}{list(self.group)}{self.bucket}"

    def describe(self) -> str:
        """A readable name for people, e.g. "decode d=1 (3) batch<=8 pages<=64 greedy"."""
        fields = BUCKET_FIELDS.get(self.kind)
        if fields is None or len(fields) != len(self.bucket):
            return f"{self.kind} d={len(self.group)} ({_instances(self.group)}) {self.bucket}"
        parts = [_sampling_label(value) if name == "sampling" else f"{name}<={value}"
                 for name, value in zip(fields, self.bucket)]
        if self.kind == "migrate":
            return f"migrate {self.group[0]}->{self.group[-1]} {' '.join(parts)}"
        return f"{self.kind} d={len(self.group)} ({_instances(self.group)}) {' '.join(parts)}"


def _instances(group: tuple[int, ...]) -> str:
    """(0, 1, 2, 3) -> "0-3"; anything not a run of consecutive instances is listed."""
    if len(group) > 2 and list(group) == list(range(group[0], group[0] + len(group))):
        return f"{group[0]}-{group[-1]}"
    return ",".join(map(str, group))


def _sampling_label(signature: Any) -> str:
    """A `SamplingSignature` (or the plain tuple of one): "greedy" or "sampling", and its logprobs columns."""
    optional = len(SamplingSignature._field_defaults)
    if not isinstance(signature, tuple) or not 0 <= len(SamplingSignature._fields) - len(signature) <= optional:
        return f"sampling={signature}"
    signature = SamplingSignature(*signature)
    label = "greedy" if signature.plain_greedy else "sampling"
    return label if signature.logprobs_columns is None else f"{label} logprobs<={signature.logprobs_columns}"


@dataclasses.dataclass
class CacheStats:
    compiles: int = 0  # programs compiled by this cache (ahead of time, on demand or in the background)
    hits: int = 0  # lookups answered by an already compiled program
    waits: int = 0  # lookups that waited for a compilation already under way
    compile_seconds: float = 0.0  # lowering + compilation time, summed
    background_compiles: int = 0  # of `compiles`, those run in the background thread

    def as_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


def enable_persistent_cache(cache_dir: str | Path | None = DEFAULT_CACHE_DIR,
                            min_compile_seconds: float = 0.0) -> Path | None:
    """Points JAX's persistent compilation cache at `cache_dir` (None: leave JAX's setting alone).

    A directory the user already configured (jax_compilation_cache_dir) wins over ours.
    """
    if cache_dir is None:
        return None
    from jax.experimental.compilation_cache import compilation_cache

    configured = jax.config.jax_compilation_cache_dir
    if configured:
        return Path(configured)
    path = Path(cache_dir).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    compilation_cache.set_cache_dir(str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_seconds)
    # Whether the cache is used is decided once, at the first compilation: start over so that programs
    # compiled from now on are stored even if something was compiled before the engine started.
    compilation_cache.reset_cache()
    return path


class ProgramCache:
    def __init__(self, lower: Callable[[ProgramKey], Any], background_threads: int = 1):
        self._lower = lower
        self._compiled: dict[ProgramKey, Any] = {}
        self._compiling: dict[ProgramKey, concurrent.futures.Future] = {}
        self._lock = threading.Lock()
        self._background = concurrent.futures.ThreadPoolExecutor(
            max_workers=background_threads, thread_name_prefix="loong-jax-compile")
        self.stats = CacheStats()

    # -- lookups ------------------------------------------------------------------------------------------------
    def is_ready(self, key: ProgramKey) -> bool:
        return key in self._compiled

    def ready_keys(self) -> frozenset[ProgramKey]:
        with self._lock:
            return frozenset(self._compiled)

    def get(self, key: ProgramKey):
        """The compiled program for `key`, compiling it now (or waiting for a compile under way) if needed."""
        with self._lock:
            program = self._compiled.get(key)
            if program is not None:
                self.stats.hits += 1
                return program
            future = self._compiling.get(key)
            if future is None:
                future = concurrent.futures.Future()
                self._compiling[key] = future
                owner = True
            else:
                self.stats.waits += 1
                owner = False
        if owner:
            self._compile_into(key, future, background=False)
        return future.result()

    def request(self, key: ProgramKey) -> concurrent.futures.Future:
        """Start compiling `key` in the background (no-op if compiled or under way); the future gives the program."""
        with self._lock:
            program = self._compiled.get(key)
            if program is not None:
                done: concurrent.futures.Future = concurrent.futures.Future()
                done.set_result(program)
                return done
            future = self._compiling.get(key)
            if future is not None:
                return future
            future = concurrent.futures.Future()
            self._compiling[key] = future
        self._background.submit(self._compile_into, key, future, True)
        return future

    def warm_up(self, keys: Sequence[ProgramKey], progress: bool = True, description: str = "compiling programs"):
        """Compile `keys` ahead of time, in this thread, with a progress bar (drawn on a terminal only)."""
        todo = [key for key in dict.fromkeys(keys) if not self.is_ready(key)]
        if not todo:
            return
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(todo), desc=description, unit="program", leave=False, disable=None)  # tty only
        try:
            for key in todo:
                if bar is not None:
                    bar.set_postfix_str(key.describe())  # drawn now: the compile may take seconds
                self.get(key)
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()

    def wait_background(self) -> None:
        """Block until every compilation under way has finished (successfully or not)."""
        with self._lock:
            pending = list(self._compiling.values())
        concurrent.futures.wait(pending)

    def close(self) -> None:
        self._background.shutdown(wait=True, cancel_futures=True)

    # -- compilation --------------------------------------------------------------------------------------------
    def _compile_into(self, key: ProgramKey, future: concurrent.futures.Future, background: bool) -> None:
        start = time.perf_counter()
        try:
            program = self._lower(key).compile()
        except BaseException as error:  # the waiter re-raises it; the key may be retried later
            with self._lock:
                self._compiling.pop(key, None)
            future.set_exception(error)
            if not background:
                raise
            return
        seconds = time.perf_counter() - start
        with self._lock:
            self._compiled[key] = program
            self._compiling.pop(key, None)
            self.stats.compiles += 1
            self.stats.compile_seconds += seconds
            if background:
                self.stats.background_compiles += 1
        logger.debug("compiled %s [%s] in %.2fs%s", key.describe(), key, seconds, " (background)" if background else "")
        future.set_result(program)

    def describe(self, keys: Iterable[ProgramKey] | None = None) -> list[str]:
        return sorted(str(k) for k in (self.ready_keys() if keys is None else keys))
