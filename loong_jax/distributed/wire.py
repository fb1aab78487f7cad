"""The bytes a multi-process step travels as: plan + step inputs down, unit outputs up (JSON, no pickle).

Data flow:
  1. Leader: `seed_unseeded(inputs)` gives every unseeded sampling row this step's random seed (an unseeded
     request draws fresh randomness at every step; drawn once here, every process samples alike), then
     `StepEncoder.encode(step, plan, inputs)`: the plan's `to_dict`, each request's `RequestInputs` and each
     migration unit's tickets, keyed by the unit's position among the plan's migration units (a
     `MigrationBatch` is rebuilt from the plan on the other side). A request is sent whole once (sampling
     parameters, prompt); later steps send only what changed: the tokens generated since, the page-table
     pages appended (or a table anew), its KV token counts, an unseeded row's step seed. So a decode step
     costs O(requests), not O(context).
  2. Follower: `StepDecoder.decode(payload)` -> `(step, plan, inputs)`, equal to what the leader dispatches
     (the decoder keeps the same per-request memory, fed the same steps in order); `encode_stop()` / a
     payload with `"stop"` ends the follower's loop.
  3. Up: `encode_outputs(outputs)` / `decode_outputs(payload)`: per program of a unit, the host copy of its
     packed int32 sampler matrix (None for a migration), exactly as the leader would have fetched it.
Request ids, instances and tokens keep their types (lists of pairs, never JSON object keys).
"""

from __future__ import annotations

import dataclasses
import json
import secrets
from typing import Sequence

import numpy as np

from loong_jax.executor.protocol import MigrationTicket, RequestInputs, StepInputs
from loong_jax.sampling.batch import SamplingRow
from loong_jax.sampling.params import SamplingParams
from loong_jax.scheduler.plan import Plan

STOP = "stop"
FORGET_AFTER_STEPS = 64  # a request absent this many steps is forgotten by both ends


def seed_unseeded(inputs: StepInputs) -> StepInputs:
    """The same inputs with a fresh seed for every request whose parameters have none (this step only)."""
    if all(r.sampling.params.seed is not None or r.sampling.params.greedy for r in inputs.requests.values()):
        return inputs
    requests = {}
    for request_id, request in inputs.requests.items():
        params = request.sampling.params
        if params.seed is None and not params.greedy:
            sampling = dataclasses.replace(request.sampling,
                                           params=dataclasses.replace(params, seed=secrets.randbits(64)))
            request = dataclasses.replace(request, sampling=sampling)
        requests[request_id] = request
    return dataclasses.replace(inputs, requests=requests)


@dataclasses.dataclass
class _Known:
    """What both ends remember of a request since it was last sent (so a step sends only what changed)."""

    params: SamplingParams  # as last sent (an unseeded row's step seed travels alone)
    prompt: tuple[int, ...]
    sample_index: int
    outputs: list[int]
    page_tables: dict[int, tuple[int, ...]]
    last_step: int


class _Requests:
    """The requests one end knows; both ends apply the same rule at the same steps, so they agree: a request
    absent from FORGET_AFTER_STEPS steps is forgotten (sent whole again if it comes back)."""

    def __init__(self):
        self.known: dict = {}

    def forget_idle(self, step: int) -> None:
        if step % FORGET_AFTER_STEPS == 0:
            self.known = {r: k for r, k in self.known.items() if k.last_step >= step - FORGET_AFTER_STEPS}


class StepEncoder(_Requests):
    """The leader's end: `encode(step, plan, inputs)` for consecutive steps of one session."""

    def encode(self, step: int, plan: Plan, inputs: StepInputs) -> bytes:
        self.forget_idle(step)
        batches = plan.migration_batches()
        position = {batch: index for index, batch in enumerate(batches)}
        document = {
            "step": step,
            "plan": plan.to_dict(),
            "requests": [self._request(request_id, request, step) for request_id, request in inputs.requests.items()],
            "migrations": [[position[batch], [dataclasses.asdict(t) for t in tickets]]
                           for batch, tickets in inputs.migrations.items()],
        }
        return json.dumps(document, separators=(",", ":")).encode()

    def _request(self, request_id, request: RequestInputs, step: int) -> dict:
        sampling = request.sampling
        entry: dict = {"id": request_id, "kv_tokens": [[i, n] for i, n in request.kv_tokens.items()]}
        known = self.known.get(request_id)
        if known is None or len(sampling.output_token_ids) < len(known.outputs):  # new (or not a growth: anew)
            known = _Known(sampling.params, tuple(sampling.prompt_token_ids), sampling.sample_index, [], {}, step)
            self.known[request_id] = known
            entry.update(params=sampling.params.to_dict(), prompt=list(known.prompt),
                         sample_index=known.sample_index)
        elif sampling.params != known.params:
            if dataclasses.replace(sampling.params, seed=None) == dataclasses.replace(known.params, seed=None):
                entry["seed"] = sampling.params.seed  # an unseeded row's fresh seed of this step
            else:
                entry["params"] = sampling.params.to_dict()
            known.params = sampling.params
        outputs = sampling.output_token_ids
        entry["output"] = list(outputs[len(known.outputs):])  # generated tokens only ever grow
        known.outputs.extend(entry["output"])
        tables = []
        for instance, pages in request.page_tables.items():
            pages = tuple(pages)
            before = known.page_tables.get(instance, ())
            keep = len(before) if pages[:len(before)] == before else 0  # tables grow, or are new
            tables.append([instance, keep, list(pages[keep:])])
            known.page_tables[instance] = pages
        known.page_tables = {i: known.page_tables[i] for i in request.page_tables}
        entry["pages"] = tables
        known.last_step = step
        return entry


class StepDecoder(_Requests):
    """A follower's end: `decode(payload)` -> (step, plan, inputs) or None (stop), for consecutive steps."""

    def decode(self, payload: bytes) -> tuple[int, Plan, StepInputs] | None:
        document = json.loads(payload)
        if document.get(STOP):
            return None
        step = document["step"]
        self.forget_idle(step)
        plan = Plan.from_dict(document["plan"])
        batches = plan.migration_batches()
        requests = {entry["id"]: self._request(entry, step) for entry in document["requests"]}
        migrations = {batches[index]: tuple(_ticket_from_dict(t) for t in tickets)
                      for index, tickets in document["migrations"]}
        return step, plan, StepInputs(requests, migrations)

    def _request(self, entry: dict, step: int) -> RequestInputs:
        request_id = entry["id"]
        if "prompt" in entry:
            self.known[request_id] = _Known(SamplingParams.from_dict(entry["params"]), tuple(entry["prompt"]),
                                            entry["sample_index"], [], {}, step)
        known = self.known[request_id]
        if "seed" in entry:
            known.params = dataclasses.replace(known.params, seed=entry["seed"])
        elif "params" in entry and "prompt" not in entry:
            known.params = SamplingParams.from_dict(entry["params"])
        known.outputs.extend(entry["output"])
        known.page_tables = {instance: known.page_tables.get(instance, ())[:keep] + tuple(appended)
                             for instance, keep, appended in entry["pages"]}
        known.last_step = step
        sampling = SamplingRow(known.params, known.prompt, tuple(known.outputs), known.sample_index)
        return RequestInputs(sampling, dict(known.page_tables), {instance: n for instance, n in entry["kv_tokens"]})


def encode_stop() -> bytes:
    return json.dumps({STOP: True}).encode()


def encode_outputs(outputs: Sequence[np.ndarray | None]) -> bytes:
    return json.dumps([None if output is None else {"shape": list(output.shape), "values": output.ravel().tolist()}
                       for output in outputs], separators=(",", ":")).encode()


def decode_outputs(payload: bytes) -> list[np.ndarray | None]:
    return [None if output is None else np.asarray(output["values"], dtype=np.int32).reshape(output["shape"])
            for output in json.loads(payload)]


def _ticket_from_dict(values: dict) -> MigrationTicket:
    return MigrationTicket(**{**values, "src_pages": tuple(values["src_pages"]),
                              "dst_pages": tuple(values["dst_pages"])})
