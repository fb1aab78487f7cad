"""Host time of each stage of the engine step (what `benchmarks/engine_decode.py` breaks down).

`Engine.step` calls `start()`, then `lap(stage, value)` after each stage: the time since the previous lap
is charged to `stage` and `value` passes through, so a stage reads as one expression. `as_dict()` is what
`Engine.stats()` reports: steps, and seconds per stage.
"""

from __future__ import annotations

import collections
import time


class StepTimer:
    """Host seconds spent in each stage of `Engine.step`, and how many steps."""

    def __init__(self):
        self.seconds: dict[str, float] = collections.defaultdict(float)
        self.steps = 0
        self._last = 0.0

    def start(self) -> "StepTimer":
        self._last = time.perf_counter()
        return self

    def lap(self, stage: str, value=None, step_done: bool = False):
        now = time.perf_counter()
        self.seconds[stage] += now - self._last
        self._last = now
        self.steps += step_done
        return value

    def as_dict(self) -> dict[str, float]:
        return {"steps": self.steps, **{f"step_seconds_{stage}": s for stage, s in self.seconds.items()}}
