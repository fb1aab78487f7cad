"""Baseline `pd-disagg` (DistServe / Splitwise style): fixed prefill instances, fixed decode instances.

Data flow of `schedule`:
  1. The first `prefill_instances` instances (default half) prefill, in fixed groups of `prefill_degree`
     (default: all of them as one group); the rest decode.
  2. Migration first: every finished prefill's KV moves, one share per (source, destination) pair per step,
     from its prefill instance to a decode instance (one already holding part of that request, else the
     one with the most free pages in an aligned decode block that can hold it plus its growth).
  3. Each idle prefill group not busy migrating takes the head requests of the queue that fit its free
     pages; each request's KV stays on as few members as hold it until it is migrated. `queue=fifo` (the
     default): arrival order, stopping at the first that does not fit; `queue=deadline`: ESP's order and
     backfilling, the head's prefill group reserved (`esp.queue.QueueDiscipline`).
  4. Decode instances run decode steps of requests whose KV is entirely on the decode side (masters,
     scale-up inside the decode side, newest-first preemption).
"""

from __future__ import annotations

from loong_jax.scheduler.baselines.static import (
    ceil_div, fixed_groups, growth_tokens, reserve_for_decodes, split_never_fitting, spread_tokens,
)
from loong_jax.scheduler.decode_planner import plan_decodes
from loong_jax.scheduler.cost.estimates import prefill_chunks_seconds
from loong_jax.scheduler.esp.queue import QueueDiscipline
from loong_jax.scheduler.groups import free_blocks, power_of_two_sizes
from loong_jax.scheduler.plan import Migration, Plan, Preemption, PrefillBatch
from loong_jax.scheduler.prefix import charge_pins, prefill_chunk, reusable
from loong_jax.scheduler.policy import PolicyDefaults
from loong_jax.scheduler.view import SchedulerView


class PdDisaggPolicy(PolicyDefaults):
    name = "pd-disagg"

    def __init__(self, prefill_instances: int | None = None, prefill_degree: int | None = None,
                 growth_horizon: int = 512, max_admit: int = 256, queue: str = "fifo", slo_scale: float = 25.0,
                 admission: bool | str = False):
        self.prefill_instances = prefill_instances
        self.prefill_degree = prefill_degree
        self.growth_horizon = growth_horizon
        self.max_admit = max_admit
        self.queue = QueueDiscipline(queue, slo_scale, admission=admission)

    def _pools(self, n: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        count = self.prefill_instances if self.prefill_instances is not None else max(1, n // 2)
        if not 0 < count < n:
            raise ValueError(f"pd-disagg needs 1 <= prefill_instances < {n}, got {count}")
        return tuple(range(count)), tuple(range(count, n))

    def schedule(self, view: SchedulerView) -> Plan:
        n = view.num_instances
        prefill_pool, decode_pool = self._pools(n)
        degree = self.prefill_degree or len(prefill_pool)
        prefill_groups = fixed_groups(len(prefill_pool), degree)
        idle = set(view.idle_instances)
        pages_free = [i.pages_free for i in view.instances]
        reserve = reserve_for_decodes(view, self.growth_horizon)
        decode_blocks = free_blocks(decode_pool, n)
        rejections, waiting = split_never_fitting(view, min(degree, max(len(b) for b in decode_blocks)))

        migrations = self._migrations(view, set(prefill_pool), decode_blocks, idle, pages_free, reserve)
        busy_now = {i for m in migrations for i in (m.src_instance, m.dst_instance)}
        waiting, reserved, refused = self.queue.fixed_layout_queue(view, waiting, self.growth_horizon, prefill_groups,
                                                          idle - busy_now)
        prefills = []
        for group in prefill_groups:
            if not idle.issuperset(group) or busy_now.intersection(group) or group == reserved:
                continue
            batch = self._prefill(view, group, waiting, pages_free)
            if batch is not None:
                prefills.append(batch)
                taken = set(batch.request_ids)
                waiting = [r for r in waiting if r.request_id not in taken]
        allowed = (idle & set(decode_pool)) - busy_now
        moving = {m.request_id for m in migrations}
        on_decode_side = [r for r in view.decoding if not r.in_flight and r.request_id not in moving
                          and set(decode_pool).issuperset(r.kv)]
        decode_plan = plan_decodes(view, on_decode_side, allowed, pages_free,
                                   scope_of=lambda r, h: next(b for b in decode_blocks if set(h) <= set(b)))
        preemptions = list(decode_plan.preemptions)
        if not migrations and not decode_plan.batches and idle.issuperset(decode_pool):
            # Nothing can move or decode: a request split across both sides holds decode pages it cannot use
            # yet. Recompute the newest such request so the others can finish (never a deadlock).
            stranded = [r for r in view.decoding if not r.in_flight and set(r.kv) & set(prefill_pool)
                        and set(r.kv) & set(decode_pool)]
            if stranded:
                preemptions.append(Preemption(max(stranded, key=lambda r: r.seq).request_id))
        return Plan(prefills=tuple(prefills), decodes=tuple(decode_plan.batches), migrations=tuple(migrations),
                    preemptions=tuple(preemptions), rejections=rejections + refused)

    def _migrations(self, view, prefill_pool, decode_blocks, idle, pages_free, reserve) -> list[Migration]:
        page_size, cost = view.page_size, view.cost_model
        pair_of_src: dict[int, int] = {}
        used_dst: set[int] = set()
        moves = []
        for request in sorted(view.decoding, key=lambda r: r.seq):
            if request.in_flight:
                continue
            shares = [i for i in request.kv if i in prefill_pool]
            if not shares:
                continue
            src = shares[0]
            if src not in idle:
                continue
            tokens = request.kv[src]
            growth = growth_tokens(view, request, self.growth_horizon) if len(shares) == 1 else 0
            held = [i for i in request.kv if i not in prefill_pool]
            block = next((b for b in decode_blocks if held and held[0] in b), None)
            if not held:  # start moving a request only if all of it fits one decode block now
                total = sum(request.kv[i] for i in shares)
                if not any(sum(pages_free[i] - reserve[i] for i in b) * page_size >= total for b in decode_blocks):
                    continue
            candidates = held + sorted((i for b in ([block] if block else decode_blocks) for i in b if i not in held),
                                       key=lambda i: -(pages_free[i] - reserve[i]))
            # Prefer a destination with room for the decode growth too; accept one without it (scale-up
            # will find the growth a page elsewhere) rather than leave the share stranded.
            for with_growth in (growth, 0):
                dst = self._destination(candidates, src, tokens + with_growth, request, idle, pair_of_src,
                                        used_dst, pages_free, reserve, page_size)
                if dst is not None:
                    break
            if dst is None:
                continue
            pages_free[dst] -= ceil_div(request.kv.get(dst, 0) + tokens, page_size) - ceil_div(request.kv.get(dst, 0), page_size)
            pair_of_src[src] = dst
            used_dst.add(dst)
            moves.append(Migration(request.request_id, src, dst, tokens, estimated_s=cost.migration_time(tokens)))
        return moves

    @staticmethod
    def _destination(candidates, src, tokens, request, idle, pair_of_src, used_dst, pages_free, reserve, page_size):
        for dst in candidates:
            if dst not in idle:
                continue
            if src in pair_of_src and pair_of_src[src] != dst:
                continue
            if src not in pair_of_src and dst in used_dst:
                continue
            held = request.kv.get(dst, 0)
            need = ceil_div(held + tokens, page_size) - ceil_div(held, page_size)
            if need <= pages_free[dst] - reserve[dst]:
                return dst
        return None

    def _prefill(self, view: SchedulerView, group, waiting, pages_free) -> PrefillBatch | None:
        page_size = view.page_size
        chosen, chunks, placements = [], [], []

        def place(request) -> bool:
            cached, length = prefill_chunk(request, group)  # a cached prefix in the pool: only the suffix
            options = [(cached, length), (0, request.prefill_target)] if cached else [(0, length)]
            for start_at, n_tokens in options:  # without room beside the prefix: the whole prompt
                for size in power_of_two_sizes(len(group)):  # as few members as hold it
                    for start in range(0, len(group) - size + 1, size):
                        members = group[start:start + size]
                        trial = list(pages_free)
                        if start_at and (not reusable(request, members) or not charge_pins(request, trial)):
                            continue  # the suffix stays beside its prefix (migrations move whole shares)
                        segments = spread_tokens(n_tokens, members, trial, page_size)
                        if segments is not None:
                            pages_free[:] = trial
                            chosen.append(request)
                            chunks.append((start_at, n_tokens))
                            placements.append(segments)
                            return True
            return False

        self.queue.admit(waiting[: self.max_admit], place)
        if not chosen:
            return None
        chunks = tuple(chunks)
        estimate = prefill_chunks_seconds(view.cost_model, len(group), chunks)
        kind = "prefill_context" if any(start for start, _ in chunks) else "prefill"
        estimate += view.compile_penalty_s(kind, group, sum(length for _, length in chunks))
        return PrefillBatch(tuple(group), tuple(r.request_id for r in chosen), chunks, tuple(placements),
                            estimated_s=estimate)
