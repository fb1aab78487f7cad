"""Baseline policies with a fixed degree: `static-sp` (one SP degree for everything) and `replicas` (d = 1).

Both use the same plans, EngineState, KV capacity and cost model as ESP, so comparisons measure the
scheduling idea only. The helpers at the top are shared with `chunked_prefill` and `pd_disagg`.

Data flow of `StaticSpPolicy.schedule`:
  1. The instances are cut into fixed aligned groups of `degree` instances.
  2. Prefill first (as vLLM does): the head requests of the queue (`queue=fifo`, the default: arrival order,
     stopping at the first that does not fit; `queue=deadline`: ESP's order, passing over what does not fit,
     the head's group reserved, `esp.queue.QueueDiscipline`) go, one by one, to the idle group with the
     fewest tokens assigned this step whose free pages hold the prompt plus its expected growth; each
     group's requests form one batch on the whole group, their KV spread evenly over every member (no
     scale-down: a static system keeps what it computed where it computed it).
  3. Otherwise the group runs one decode step of all its decoding requests: masters with room, scale-up only
     inside the group, newest-first recompute preemption when the group is out of pages.
  4. A request larger than one group's whole pool can never run: it is rejected, not queued forever.
"""

from __future__ import annotations

from loong_jax.scheduler.decode_planner import home_group, plan_decodes
from loong_jax.scheduler.esp.queue import QueueDiscipline
from loong_jax.scheduler.cost.estimates import prefill_chunks_seconds
from loong_jax.scheduler.plan import DecodeBatch, Plan, PrefillBatch
from loong_jax.scheduler.prefix import charge_pins, prefill_chunk, reusable, waits_for_prefix
from loong_jax.scheduler.policy import PolicyDefaults, degrees_do_not_apply
from loong_jax.scheduler.view import RequestView, SchedulerView, ceil_div


def growth_tokens(view: SchedulerView, request: RequestView, horizon: int) -> int:
    return min(request.remaining_new_tokens(view.default_output_tokens), horizon)


def peak_tokens(request: RequestView) -> int:
    """KV tokens the request holds at its end (every token but the last output); with no known cap, the
    prompt plus one."""
    extra = request.max_new_tokens - request.num_generated if request.max_new_tokens is not None else 1
    return request.prefill_target + max(1, extra) - 1


def split_never_fitting(view: SchedulerView, members: int, slack_pages: int = 0):
    """(rejected ids, the other waiting requests): a request whose peak KV exceeds a whole group of
    `members` instances can never run under a fixed-degree policy."""
    pages = members * min(i.pages_total for i in view.instances) - slack_pages
    rejected, kept = [], []
    for request in view.waiting:
        (rejected if ceil_div(peak_tokens(request), view.page_size) > pages else kept).append(request)
    return tuple(r.request_id for r in rejected), kept


def fixed_groups(num_instances: int, degree: int) -> list[tuple[int, ...]]:
    if degree < 1 or degree & (degree - 1) or num_instances % degree:
        raise ValueError(f"degree must be a power of two dividing the {num_instances} instances, got {degree}")
    return [tuple(range(start, start + degree)) for start in range(0, num_instances, degree)]


def spread_tokens(n_tokens: int, members, pages_free: list[int], page_size: int, keep_free: int = 0):
    """Segments putting n_tokens evenly over `members` in page-aligned shares (last member gets the rest and
    keeps `keep_free` slots free); subtracts the pages from `pages_free`; None if they do not fit."""
    members = list(members)
    share = ceil_div(ceil_div(n_tokens, len(members)), page_size) * page_size
    segments, remaining = [], n_tokens
    for k, instance in enumerate(members):
        room = pages_free[instance] * page_size - (keep_free if k == len(members) - 1 else 0)
        take = remaining if k == len(members) - 1 else min(share, remaining)
        take = min(take, max(0, room))
        if take > 0:
            segments.append((instance, take))
            remaining -= take
    if remaining:  # uneven free pages: fill whatever room is left, front to back
        for k, (instance, take) in enumerate(segments):
            extra = min(remaining, pages_free[instance] * page_size - take)
            if extra > 0:
                segments[k] = (instance, take + extra)
                remaining -= extra
    if remaining:
        return None
    for instance, take in segments:
        pages_free[instance] -= ceil_div(take, page_size)
    return tuple(segments)


def capped_growth(view: SchedulerView, request: RequestView, horizon: int, members: int, slack_pages: int = 0) -> int:
    """Growth to reserve, never more than an empty group of `members` instances has beside the prompt (so a
    request that fits an empty group is always admissible there)."""
    room = (members * min(i.pages_total for i in view.instances) - slack_pages) * view.page_size
    return max(0, min(growth_tokens(view, request, horizon), room - request.prefill_target))


def reserve_for_decodes(view: SchedulerView, horizon: int) -> list[int]:
    """Pages per instance kept for the expected growth of the decoding requests it masters."""
    reserve = [0] * view.num_instances
    for request in view.decoding:
        if request.master is not None:
            tail = (-request.kv.get(request.master, 0)) % view.page_size
            reserve[request.master] += ceil_div(max(0, growth_tokens(view, request, horizon) - tail), view.page_size)
    return reserve


def merge_decode_batches(view: SchedulerView, batches: list[DecodeBatch], group, fused: PrefillBatch | None = None):
    """One decode step on the fixed `group` for every request of `batches` (all inside it)."""
    request_ids = tuple(r for b in batches for r in b.request_ids)
    masters = tuple(m for b in batches for m in b.masters)
    if not request_ids and fused is None:
        return None
    contexts = {r.request_id: r.context_len for r in view.decoding}
    estimate = view.cost_model.decode_time(len(group), len(request_ids), sum(contexts[r] for r in request_ids))
    if fused is not None:
        estimate += fused.estimated_s - view.cost_model.prefill[len(group)].constant
    estimate += view.compile_penalty_s("decode", group, len(request_ids))
    return DecodeBatch(tuple(group), request_ids, masters, fused_prefill=fused, estimated_s=estimate)


def plan_group_decodes(view: SchedulerView, group, requests: list[RequestView], pages_free: list[int],
                       decodes: list[DecodeBatch], preemptions: list) -> None:
    """One decode step on the fixed `group` for `requests` (their KV inside it), appended to `decodes`, with
    the preemptions that make room appended to `preemptions`."""
    decode_plan = plan_decodes(view, requests, set(group), pages_free, scope_of=lambda r, h, g=group: g)
    preemptions.extend(decode_plan.preemptions)
    merged = merge_decode_batches(view, decode_plan.batches, group)
    if merged is not None:
        decodes.append(merged)


class OneDegreePolicy(PolicyDefaults):
    """A policy on fixed aligned groups of one `degree` (None: every instance in one group). A request
    lives inside one group, so one group's pool is the most it can ever get; the command line's prefill
    degree is that degree (a different decode degree does not apply)."""

    degree: int | None = None

    @classmethod
    def degree_options(cls, prefill_degree: int | None, decode_degree: int | None) -> dict:
        if decode_degree is None or decode_degree == prefill_degree:
            return {"degree": prefill_degree}
        return super().degree_options(prefill_degree, decode_degree)

    def request_token_limits(self, num_instances: int, pages_per_instance: int, page_size: int) -> tuple[int, int]:
        group_tokens = (self.degree or num_instances) * pages_per_instance * page_size
        return group_tokens, group_tokens


class StaticSpPolicy(OneDegreePolicy):
    name = "static-sp"

    def __init__(self, degree: int | None = None, growth_horizon: int = 512, max_admit: int = 256,
                 queue: str = "fifo", slo_scale: float = 25.0,
                 admission: bool | str = False):
        self.degree = degree
        self.growth_horizon = growth_horizon
        self.max_admit = max_admit
        self.queue = QueueDiscipline(queue, slo_scale, admission=admission)

    def _degree(self, view: SchedulerView) -> int:
        return self.degree or view.num_instances

    def schedule(self, view: SchedulerView) -> Plan:
        groups = fixed_groups(view.num_instances, self._degree(view))
        idle = set(view.idle_instances)
        pages_free = [i.pages_free for i in view.instances]
        reserve = reserve_for_decodes(view, self.growth_horizon)
        rejections, waiting = split_never_fitting(view, self._degree(view))
        waiting = [r for r in waiting if not waits_for_prefix(r, view)]  # its cached prefix frees soon
        queue, reserved, refused = self.queue.fixed_layout_queue(view, waiting, self.growth_horizon, groups, idle)
        idle_groups = [g for g in groups if idle.issuperset(g)]
        prefills = self._prefills(view, [g for g in idle_groups if g != reserved], queue, pages_free, reserve)
        prefilling = {g for b in prefills for g in [b.group]}
        decodes, preemptions = [], []
        for group in idle_groups:
            if group in prefilling:
                continue  # prefill first: this group's decodes wait a step
            members = set(group)
            requests = [r for r in view.decoding if not r.in_flight and members.issuperset(home_group(r, view.num_instances))]
            plan_group_decodes(view, group, requests, pages_free, decodes, preemptions)
        return Plan(prefills=tuple(prefills), decodes=tuple(decodes), preemptions=tuple(preemptions),
                    rejections=rejections + refused)

    def _prefills(self, view, idle_groups, queue, pages_free, reserve) -> list[PrefillBatch]:
        """The queue's head requests, each to the idle group with the fewest tokens assigned so far that
        holds it (spread over all its members), the group holding its cached prefix first (it prefills only
        the suffix there); a request no idle group holds now stops admission (fifo) or is passed over
        (deadline)."""
        page_size = view.page_size
        usable = [max(0, pages_free[i] - reserve[i]) for i in range(view.num_instances)]
        assigned: dict[tuple, list] = {g: [] for g in idle_groups}
        load = {g: 0 for g in idle_groups}

        def place(request) -> bool:
            nonlocal usable
            for group in sorted(idle_groups, key=lambda g: (not reusable(request, g), load[g],
                                                            -sum(usable[i] for i in g))):
                growth = capped_growth(view, request, self.growth_horizon, len(group))
                start, length = prefill_chunk(request, group)
                trial = list(usable)
                if start and not charge_pins(request, trial):
                    continue
                if ceil_div(length + growth, page_size) > sum(trial[i] for i in group):
                    continue
                segments = spread_tokens(length, group, trial, page_size, keep_free=growth)
                if segments is None:
                    continue
                if start:
                    charge_pins(request, pages_free)
                usable = trial
                for instance, n_tokens in segments:
                    pages_free[instance] -= ceil_div(n_tokens, page_size)
                assigned[group].append((request, start, segments))
                load[group] += length
                return True
            return False

        self.queue.admit(queue[: self.max_admit], place)
        batches = []
        for group, items in assigned.items():
            if not items:
                continue
            chunks = tuple((start, r.prefill_target - start) for r, start, _ in items)
            estimate = prefill_chunks_seconds(view.cost_model, len(group), chunks)
            kind = "prefill_context" if any(start for start, _ in chunks) else "prefill"
            estimate += view.compile_penalty_s(kind, group, sum(length for _, length in chunks))
            batches.append(PrefillBatch(tuple(group), tuple(r.request_id for r, _, _ in items), chunks,
                                        tuple(seg for _, _, seg in items), estimated_s=estimate))
        return batches


class ReplicasPolicy(StaticSpPolicy):
    """Every instance serves its own requests (degree 1, no sequence parallelism)."""

    name = "replicas"

    def __init__(self, growth_horizon: int = 512, max_admit: int = 256, queue: str = "fifo", slo_scale: float = 25.0,
                 admission: bool | str = False):
        super().__init__(degree=1, growth_horizon=growth_horizon, max_admit=max_admit, queue=queue,
                         slo_scale=slo_scale, admission=admission)

    @classmethod
    def degree_options(cls, prefill_degree: int | None, decode_degree: int | None) -> dict:
        degrees_do_not_apply(cls.name, prefill_degree, decode_degree)  # the degree is always 1
        return {}
