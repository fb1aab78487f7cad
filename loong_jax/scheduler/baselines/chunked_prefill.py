"""Baseline `chunked-prefill` (SplitFuse / Sarathi-Serve): prefill chunks piggybacked on decode steps.

Data flow of `schedule`, per idle fixed group of `degree` instances (default: all instances in one group):
  1. Decode every decoding request of the group (masters, scale-up inside the group, newest-first
     preemption), as one step.
  2. Fill the rest of the step's token budget (`chunk_size` minus one token per decode) with prompt chunks:
     first the requests already part-way through their prompt, then new requests from the queue whose whole
     prompt plus growth fits the group's pages after what the part-way prompts still need (so admitted
     prompts can always finish and never deadlock). `queue=fifo` (the default): arrival order, stopping at
     the first that does not fit; `queue=deadline`: ESP's order and backfilling, and the group reserved for
     the head takes no new prompt (`esp.queue.QueueDiscipline`).
  3. Chunk KV is spread evenly over the group. The chunks ride in the decode step as its fused prefill; with
     no decodes they run as a plain prefill batch.
"""

from __future__ import annotations

from loong_jax.scheduler.baselines.static import (
    OneDegreePolicy, capped_growth, ceil_div, fixed_groups, merge_decode_batches, reserve_for_decodes,
    split_never_fitting, spread_tokens,
)
from loong_jax.scheduler.decode_planner import home_group, plan_decodes
from loong_jax.scheduler.cost.estimates import prefill_chunks_seconds
from loong_jax.scheduler.esp.queue import QueueDiscipline
from loong_jax.scheduler.plan import Plan, PrefillBatch
from loong_jax.scheduler.prefix import charge_pins, prefill_chunk
from loong_jax.scheduler.view import SchedulerView


class ChunkedPrefillPolicy(OneDegreePolicy):
    name = "chunked-prefill"

    def __init__(self, chunk_size: int = 2048, degree: int | None = None, growth_horizon: int = 512,
                 max_admit: int = 256, queue: str = "fifo", slo_scale: float = 25.0,
                 admission: bool | str = False):
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.chunk_size = chunk_size
        self.degree = degree
        self.growth_horizon = growth_horizon
        self.max_admit = max_admit
        self.queue = QueueDiscipline(queue, slo_scale, admission=admission)

    def schedule(self, view: SchedulerView) -> Plan:
        degree = self.degree or view.num_instances
        groups = fixed_groups(view.num_instances, degree)
        idle = set(view.idle_instances)
        pages_free = [i.pages_free for i in view.instances]
        reserve = reserve_for_decodes(view, self.growth_horizon)
        rejections, waiting = split_never_fitting(view, degree, slack_pages=degree)
        waiting, reserved, refused = self.queue.fixed_layout_queue(view, waiting, self.growth_horizon, groups, idle)
        prefills, decodes, preemptions = [], [], []
        for group in groups:
            if not idle.issuperset(group):
                continue
            members = set(group)
            decoding = [r for r in view.decoding if not r.in_flight and members.issuperset(home_group(r, view.num_instances))]
            decode_plan = plan_decodes(view, decoding, members, pages_free, scope_of=lambda r, h, g=group: g)
            preemptions.extend(decode_plan.preemptions)
            n_decodes = sum(len(b.request_ids) for b in decode_plan.batches)
            offered = [] if group == reserved else waiting  # a reserved group only finishes its part-way prompts
            fused, admitted = self._chunks(view, group, offered, pages_free, reserve, self.chunk_size - n_decodes)
            taken = set(admitted)
            waiting = [r for r in waiting if r.request_id not in taken]
            if n_decodes:
                decodes.append(merge_decode_batches(view, decode_plan.batches, group, fused))
            elif fused is not None:
                prefills.append(fused)
        return Plan(prefills=tuple(prefills), decodes=tuple(decodes), preemptions=tuple(preemptions),
                    rejections=rejections + refused)

    def _chunks(self, view: SchedulerView, group, waiting, pages_free, reserve, budget: int):
        """(fused prefill batch or None, newly admitted request ids)."""
        page_size = view.page_size
        members = set(group)
        partial = sorted((r for r in view.prefilling if not r.in_flight and members.issuperset(r.kv)),
                         key=lambda r: r.seq)
        all_partial = [r for r in view.prefilling if members.issuperset(r.kv)]
        # Pages the part-way prompts still need (with growth): new prompts may only use what is left.
        growth = {r.request_id: capped_growth(view, r, self.growth_horizon, len(group), len(group))
                  for r in all_partial}
        owed = sum(ceil_div(r.prefill_target - r.num_computed + growth[r.request_id], page_size) for r in all_partial)
        spare = sum(max(0, pages_free[i] - reserve[i]) for i in group) - owed
        chosen, admitted = list(partial), []
        unclaimed = budget - sum(r.prefill_target - r.num_computed for r in partial)

        def place(request) -> bool:
            nonlocal spare, unclaimed
            start, length = prefill_chunk(request, group)  # a cached prefix on the group: only the suffix
            need = ceil_div(length + capped_growth(view, request, self.growth_horizon, len(group),
                                                   len(group)), page_size)
            need += len(group) + sum(request.cached_pins.values()) * bool(start)  # partly filled pages, pins
            if unclaimed <= 0 or need > spare:
                return False
            spare -= need
            unclaimed -= length
            chosen.append(request)
            admitted.append(request)
            return True

        self.queue.admit(waiting[: self.max_admit], place)
        request_ids, chunks, placement = [], [], []
        for request in chosen:
            if budget <= 0:
                break
            start, _ = prefill_chunk(request, group)
            length = min(request.prefill_target - start, budget)
            trial = list(pages_free)
            if start > request.num_computed and not charge_pins(request, trial):
                start, length = request.num_computed, min(request.prefill_target - request.num_computed, budget)
                trial = list(pages_free)
            segments = spread_tokens(length, group, trial, page_size)
            if segments is None:
                break
            pages_free[:] = trial
            budget -= length
            request_ids.append(request.request_id)
            chunks.append((start, length))
            placement.append(segments)
        if not request_ids:
            return None, []
        placed = set(request_ids)
        estimate = prefill_chunks_seconds(view.cost_model, len(group), chunks)
        kind = "prefill_context" if any(start for start, _ in chunks) else "prefill"
        estimate += view.compile_penalty_s(kind, group, sum(length for _, length in chunks))
        batch = PrefillBatch(tuple(group), tuple(request_ids), tuple(chunks), tuple(placement), estimated_s=estimate)
        return batch, [r.request_id for r in admitted if r.request_id in placed]
