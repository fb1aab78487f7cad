"""Counting XLA compilations per jitted function, to check that a program is
compiled once per (group, bucket) and reused afterwards."""

from __future__ import annotations

import collections
import contextlib
import logging
import re

# JAX logs every lowering for compilation here ("Compiling jit(name) with ..."),
# at DEBUG level unless jax_log_compiles is on.
_LOGGER = logging.getLogger("jax._src.interpreters.pxla")
_COMPILING = re.compile(r"Compiling jit\((\w+)\)")


@contextlib.contextmanager
def count_compiles():
    """Yields a Counter: function name -> compilations while the block runs."""
    counts: collections.Counter[str] = collections.Counter()

    class _Counter(logging.Handler):
        def emit(self, record):
            match = _COMPILING.match(record.getMessage())
            if match:
                counts[match.group(1)] += 1

    handler = _Counter(level=logging.DEBUG)
    previous_level = _LOGGER.level
    _LOGGER.addHandler(handler)
    _LOGGER.setLevel(logging.DEBUG)
    try:
        yield counts
    finally:
        _LOGGER.removeHandler(handler)
        _LOGGER.setLevel(previous_level)
