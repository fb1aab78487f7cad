"""Fitting a cost model to a profile: samples in, `CostModel` out (the model's form is in `model.py`).

Data flow of `fit_cost_model(samples, ...)`:
  1. Samples are grouped by kind and degree of parallelism d: prefill rows [1, Σl, Σl²], decode rows
     [1, batch, Σcontext], migration rows [1, bytes], each against its measured seconds.
  2. Every group is solved by `relative_nonnegative_least_squares`: least squares on relative error with
     each coefficient at or above a lower bound: 0, and from the second degree on `_floor_of` the next
     smaller degree d' (θ_d ≥ θ_d'·d'/d), so that a group of d is never faster than d instances' worth
     of work.
  3. The coefficients, the KV geometry and the provenance make the `CostModel`.
`raised_to_floors` applies the same floors to coefficients put together from several sources.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Iterable

import numpy as np

from loong_jax.scheduler.cost.model import (CostModel, DecodeCoefficients, DecodeSample, MigrationSample,
                                            PrefillCoefficients, PrefillSample, ProfileSample, _optional_float)


def relative_nonnegative_least_squares(
    features: np.ndarray, measured: np.ndarray, lower_bounds: np.ndarray | None = None
) -> np.ndarray:
    """argmin_{θ ≥ lower_bounds} Σ_i ((features_i·θ − measured_i) / measured_i)²  (lower bounds default to 0).

    Weighted least squares with weights 1/measured² is ordinary least squares on rows divided by their
    measurement. The bounds (0: a negative constant or slope is a fitting artefact, not physics; or the
    per-degree floors of `fit_cost_model`) are enforced exactly: with θ = lower_bounds + φ, φ ≥ 0, every
    subset of free coefficients (at most three) is solved and the best non-negative solution kept.
    """
    features = np.asarray(features, dtype=np.float64)  # [samples, coefficients]
    measured = np.asarray(measured, dtype=np.float64)  # [samples]
    if np.any(measured <= 0):
        raise ValueError("measured times must be positive for a relative-error fit")
    num_coefficients = features.shape[1]
    floor = np.zeros(num_coefficients) if lower_bounds is None else np.asarray(lower_bounds, dtype=np.float64)
    if floor.shape != (num_coefficients,) or np.any(floor < 0):
        raise ValueError(f"lower_bounds must be {num_coefficients} non-negative numbers, got {lower_bounds}")
    scaled = features / measured[:, None]
    target = 1.0 - scaled @ floor  # what the part above the floor must explain
    # Columns span very different magnitudes (1 vs Σl² ~ 1e10): normalise them for a well-conditioned solve.
    column_norms = np.linalg.norm(scaled, axis=0)
    column_norms[column_norms == 0] = 1.0
    scaled = scaled / column_norms
    best, best_residual = np.zeros(num_coefficients), float(np.sum(target**2))
    for size in range(1, num_coefficients + 1):
        for subset in itertools.combinations(range(num_coefficients), size):
            columns = list(subset)
            solution, *_ = np.linalg.lstsq(scaled[:, columns], target, rcond=None)
            if np.any(solution < 0):
                continue
            candidate = np.zeros(num_coefficients)
            candidate[columns] = solution
            residual = float(np.sum((scaled @ candidate - target) ** 2))
            if residual < best_residual - 1e-15:
                best, best_residual = candidate, residual
    return floor + best / column_norms


def fit_cost_model(
    samples: Iterable[ProfileSample],
    *,
    tp: int,
    kv_bytes_per_token: int,
    pages_per_instance: int,
    page_size: int,
    migration_seconds_per_byte: float | None = None,
    migration_latency_s: float = 0.0,
    description: str = "",
    provenance: str = "measured",
    metadata: dict | None = None,
) -> CostModel:
    """Fit prefill and decode coefficients per DoP and migration from profile samples. Without migration
    samples the given `migration_seconds_per_byte` is kept; None (one instance: nothing to move) leaves the
    model without a migration term."""
    samples = list(samples)
    prefill: dict[int, PrefillCoefficients] = {}
    decode: dict[int, DecodeCoefficients] = {}
    floor = None  # (degree, coefficients) of the next smaller degree: its instance-time is the floor
    for dop in sorted({s.dop for s in samples if isinstance(s, PrefillSample)}):
        rows = [s for s in samples if isinstance(s, PrefillSample) and s.dop == dop]
        _require_rows(rows, 3, f"prefill DoP {dop}")
        features = np.array([[1.0, sum(s.lengths), sum(x * x for x in s.lengths)] for s in rows])
        fitted = relative_nonnegative_least_squares(features, [s.seconds for s in rows], _floor_of(floor, dop))
        prefill[dop] = PrefillCoefficients(*fitted)
        floor = (dop, fitted)
    floor = None
    for dop in sorted({s.dop for s in samples if isinstance(s, DecodeSample)}):
        rows = [s for s in samples if isinstance(s, DecodeSample) and s.dop == dop]
        _require_rows(rows, 3, f"decode DoP {dop}")
        features = np.array([[1.0, s.batch, s.total_context] for s in rows])
        fitted = relative_nonnegative_least_squares(features, [s.seconds for s in rows], _floor_of(floor, dop))
        decode[dop] = DecodeCoefficients(*fitted)
        floor = (dop, fitted)
    migrations = [s for s in samples if isinstance(s, MigrationSample)]
    if migrations:
        _require_rows(migrations, 2, "migration")
        features = np.array([[1.0, s.num_bytes] for s in migrations])
        migration_latency_s, migration_seconds_per_byte = relative_nonnegative_least_squares(
            features, [s.seconds for s in migrations]
        )
    return CostModel(
        tp=tp,
        prefill=prefill,
        decode=decode,
        migration_seconds_per_byte=_optional_float(migration_seconds_per_byte),
        migration_latency_s=float(migration_latency_s),
        kv_bytes_per_token=kv_bytes_per_token,
        pages_per_instance=pages_per_instance,
        page_size=page_size,
        description=description,
        provenance=provenance,
        metadata=dict(metadata or {}),
    )


def raised_to_floors(coefficients: dict[int, PrefillCoefficients | DecodeCoefficients]) -> dict:
    """Per-degree coefficients (from different sources, e.g. a measured d = 1 beside a projected d > 1) with
    each degree raised, coefficient by coefficient, to the floor its next smaller degree sets (`_floor_of`):
    no group ends up faster than its members put together."""
    raised, floor = {}, None
    for dop in sorted(coefficients):
        values = np.asarray(dataclasses.astuple(coefficients[dop]), dtype=np.float64)
        bound = _floor_of(floor, dop)
        if bound is not None:
            values = np.maximum(values, bound)
        raised[dop] = type(coefficients[dop])(*map(float, values))
        floor = (dop, values)
    return raised


def _floor_of(smaller: tuple[int, np.ndarray] | None, dop: int) -> np.ndarray | None:
    """Coefficient floors of degree `dop`: d·θ_d ≥ d'·θ_d' for the next smaller fitted degree d'.

    A group of d instances cannot do in d·t instance-seconds what d' instances need more for (the work is
    the same; a wider group only adds communication), and every feature (1, Σl, Σl², batch, Σcontext) is
    non-negative, so bounding each coefficient bounds every batch: chained from the smallest degree, a
    group of d is never faster than d instances' worth of one instance's work (efficiency ≤ 1).
    """
    if smaller is None:
        return None
    smaller_dop, coefficients = smaller
    return coefficients * smaller_dop / dop


def _require_rows(rows: list, minimum: int, what: str) -> None:
    if len(rows) < minimum:
        raise ValueError(f"{what}: {len(rows)} samples, need at least {minimum} to fit")
