"""The plan: what a scheduling policy decides for one step, as a small serialisable value.

Data flow:
  1. A policy reads a `SchedulerView` and returns a `Plan` that only touches IDLE instances.
  2. `Plan.work_units()` splits it into the units an executor dispatches side by side: every
     `PrefillBatch`, every `DecodeBatch` (optionally carrying a chunked-prefill batch fused into the same
     step on the same group) and one `MigrationBatch` per (source, destination) pair of migrations.
     Every instance belongs to at most one unit of a plan; each unit keeps its instances busy until its
     `UnitResult` comes back.
  3. `EngineState.on_dispatched(plan)` applies the page accounting in a fixed order: rejections,
     preemptions, migrations, prefills, decodes.
  4. `Plan.to_dict()` / `Plan.from_dict()` round-trip through JSON, so a leader host can broadcast the plan
     to the others of a multi-controller run.

Request ids are `int` or `str` (both survive JSON unchanged).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Union

RequestId = Union[int, str]
Segment = tuple[int, int]  # (instance, n_tokens): a run of consecutive tokens kept on one instance


def _ints(values) -> tuple[int, ...]:
    return tuple(int(v) for v in values)


def _segments(values) -> tuple[Segment, ...]:
    return tuple((int(instance), int(n_tokens)) for instance, n_tokens in values)


@dataclass(frozen=True)
class PrefillBatch:
    """Prompts (or chunks of prompts) packed into one token stream and run as a ring on `group`.

    `chunks[i] = (start, length)`: request i computes the KV of its tokens start..start+length-1 (the whole
    prompt is `(0, prompt_len)`; chunked prefill uses several steps). `placement[i]` lists, in token order,
    the segments `(instance, n_tokens)` that keep those tokens' KV; their lengths sum to the chunk length.
    Group instances named in no placement keep nothing and leave after the step (proactive scale-down).
    """

    group: tuple[int, ...]
    request_ids: tuple[RequestId, ...]
    chunks: tuple[tuple[int, int], ...]
    placement: tuple[tuple[Segment, ...], ...]
    estimated_s: float = 0.0  # the policy's cost-model estimate (used for busy-until bookkeeping only)

    def __post_init__(self) -> None:
        n = len(self.request_ids)
        if len(self.chunks) != n or len(self.placement) != n:
            raise ValueError(
                f"PrefillBatch: {n} requests but {len(self.chunks)} chunks and {len(self.placement)} placements"
            )
        if not self.group or len(set(self.group)) != len(self.group):
            raise ValueError(f"PrefillBatch: group {self.group} must be non-empty without repeats")
        members = set(self.group)
        for rid, (start, length), segments in zip(self.request_ids, self.chunks, self.placement):
            if start < 0 or length <= 0:
                raise ValueError(f"PrefillBatch: request {rid!r} has chunk ({start}, {length})")
            if sum(n_tokens for _, n_tokens in segments) != length:
                raise ValueError(f"PrefillBatch: placement of {rid!r} covers {segments}, chunk length {length}")
            for instance, n_tokens in segments:
                if instance not in members or n_tokens <= 0:
                    raise ValueError(f"PrefillBatch: bad segment ({instance}, {n_tokens}) of {rid!r} for group {self.group}")

    @property
    def num_tokens(self) -> int:
        return sum(length for _, length in self.chunks)

    @property
    def all_request_ids(self) -> tuple[RequestId, ...]:
        """Every request the unit runs (as for every work unit)."""
        return self.request_ids

    @property
    def kept_instances(self) -> tuple[int, ...]:
        """Instances that keep some KV after the step, in group order."""
        kept = {instance for segments in self.placement for instance, _ in segments}
        return tuple(i for i in self.group if i in kept)

    @property
    def leaving_instances(self) -> tuple[int, ...]:
        """Group members that keep nothing: they leave the group after the prefill (scale-down)."""
        kept = set(self.kept_instances)
        return tuple(i for i in self.group if i not in kept)

    def to_dict(self) -> dict:
        return {
            "group": list(self.group),
            "request_ids": list(self.request_ids),
            "chunks": [list(c) for c in self.chunks],
            "placement": [[list(s) for s in segments] for segments in self.placement],
            "estimated_s": self.estimated_s,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "PrefillBatch":
        return cls(
            group=_ints(d["group"]),
            request_ids=tuple(d["request_ids"]),
            chunks=tuple((int(s), int(n)) for s, n in d["chunks"]),
            placement=tuple(_segments(segments) for segments in d["placement"]),
            estimated_s=float(d.get("estimated_s", 0.0)),
        )


@dataclass(frozen=True)
class DecodeBatch:
    """One decode step of `request_ids` on `group` (multi-master distributed decode).

    `masters[i]` is the instance that computes request i's dense layers and appends its new KV token.
    `group` holds every master and every instance holding KV of these requests. A master that holds none of
    its request's earlier KV is a scale-up (the old KV stays where it is). `fused_prefill`, when set, is a
    chunked-prefill batch on the same group run in the same step (SplitFuse / Sarathi piggybacking).
    """

    group: tuple[int, ...]
    request_ids: tuple[RequestId, ...]
    masters: tuple[int, ...]
    fused_prefill: PrefillBatch | None = None
    estimated_s: float = 0.0

    def __post_init__(self) -> None:
        if len(self.masters) != len(self.request_ids):
            raise ValueError(f"DecodeBatch: {len(self.request_ids)} requests but {len(self.masters)} masters")
        if not self.group or len(set(self.group)) != len(self.group):
            raise ValueError(f"DecodeBatch: group {self.group} must be non-empty without repeats")
        members = set(self.group)
        if not members.issuperset(self.masters):
            raise ValueError(f"DecodeBatch: masters {self.masters} not all in group {self.group}")
        if self.fused_prefill is not None and set(self.fused_prefill.group) != members:
            raise ValueError(f"DecodeBatch: fused prefill group {self.fused_prefill.group} is not {self.group}")

    @property
    def all_request_ids(self) -> tuple[RequestId, ...]:
        """The decoding requests, then those of the fused prefill."""
        fused = () if self.fused_prefill is None else self.fused_prefill.request_ids
        return self.request_ids + fused

    def to_dict(self) -> dict:
        return {
            "group": list(self.group),
            "request_ids": list(self.request_ids),
            "masters": list(self.masters),
            "fused_prefill": None if self.fused_prefill is None else self.fused_prefill.to_dict(),
            "estimated_s": self.estimated_s,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "DecodeBatch":
        fused = d.get("fused_prefill")
        return cls(
            group=_ints(d["group"]),
            request_ids=tuple(d["request_ids"]),
            masters=_ints(d["masters"]),
            fused_prefill=None if fused is None else PrefillBatch.from_dict(fused),
            estimated_s=float(d.get("estimated_s", 0.0)),
        )


@dataclass(frozen=True)
class Migration:
    """Move ALL of a request's KV held on `src_instance` (`n_tokens` tokens) to `dst_instance`."""

    request_id: RequestId
    src_instance: int
    dst_instance: int
    n_tokens: int
    estimated_s: float = 0.0

    def __post_init__(self) -> None:
        if self.src_instance == self.dst_instance or self.n_tokens <= 0:
            raise ValueError(f"Migration: bad move {self}")

    def to_dict(self) -> dict:
        return {"request_id": self.request_id, "src_instance": self.src_instance,
                "dst_instance": self.dst_instance, "n_tokens": self.n_tokens, "estimated_s": self.estimated_s}

    @classmethod
    def from_dict(cls, d: dict) -> "Migration":
        return cls(d["request_id"], int(d["src_instance"]), int(d["dst_instance"]), int(d["n_tokens"]),
                   float(d.get("estimated_s", 0.0)))


@dataclass(frozen=True)
class MigrationBatch:
    """The migrations of one plan from one source instance to one destination: one program, one unit."""

    src_instance: int
    dst_instance: int
    migrations: tuple[Migration, ...]
    estimated_s: float = 0.0

    @property
    def group(self) -> tuple[int, int]:
        return (self.src_instance, self.dst_instance)

    @property
    def request_ids(self) -> tuple[RequestId, ...]:
        return tuple(m.request_id for m in self.migrations)

    @property
    def all_request_ids(self) -> tuple[RequestId, ...]:
        return self.request_ids

    @property
    def num_tokens(self) -> int:
        return sum(m.n_tokens for m in self.migrations)


@dataclass(frozen=True)
class Preemption:
    """Recompute-preemption: free the request's KV and put it back to waiting, generated tokens kept."""

    request_id: RequestId

    def to_dict(self) -> dict:
        return {"request_id": self.request_id}

    @classmethod
    def from_dict(cls, d: dict) -> "Preemption":
        return cls(d["request_id"])


WorkUnit = Union[PrefillBatch, DecodeBatch, MigrationBatch]


@dataclass(frozen=True)
class Plan:
    """Everything decided for one scheduling step. Empty plans are valid (nothing to do now).

    `rejections` name waiting requests the policy can never serve (e.g. a prompt larger than any group it
    may use); the engine finishes them with an error instead of queueing them forever.
    """

    prefills: tuple[PrefillBatch, ...] = ()
    decodes: tuple[DecodeBatch, ...] = ()
    migrations: tuple[Migration, ...] = ()
    preemptions: tuple[Preemption, ...] = ()
    rejections: tuple[RequestId, ...] = ()

    @property
    def is_empty(self) -> bool:
        return not (self.prefills or self.decodes or self.migrations or self.preemptions or self.rejections)

    def migration_batches(self) -> tuple[MigrationBatch, ...]:
        """Migrations grouped by (source, destination), in first-appearance order."""
        grouped: dict[tuple[int, int], list[Migration]] = {}
        for m in self.migrations:
            grouped.setdefault((m.src_instance, m.dst_instance), []).append(m)
        return tuple(
            MigrationBatch(src, dst, tuple(moves), sum(m.estimated_s for m in moves))
            for (src, dst), moves in grouped.items()
        )

    def work_units(self) -> Iterator[WorkUnit]:
        """Units an executor dispatches independently (disjoint instance sets)."""
        yield from self.migration_batches()
        yield from self.prefills
        yield from self.decodes

    def to_dict(self) -> dict:
        return {
            "prefills": [b.to_dict() for b in self.prefills],
            "decodes": [b.to_dict() for b in self.decodes],
            "migrations": [m.to_dict() for m in self.migrations],
            "preemptions": [p.to_dict() for p in self.preemptions],
            "rejections": list(self.rejections),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        return cls(
            prefills=tuple(PrefillBatch.from_dict(b) for b in d.get("prefills", ())),
            decodes=tuple(DecodeBatch.from_dict(b) for b in d.get("decodes", ())),
            migrations=tuple(Migration.from_dict(m) for m in d.get("migrations", ())),
            preemptions=tuple(Preemption.from_dict(p) for p in d.get("preemptions", ())),
            rejections=tuple(d.get("rejections", ())),
        )
