"""The ESP policy (default): LoongServe §5 scalable scheduling, one `schedule(view)` per engine event.

Data flow of one call:
  1. Snapshot (`esp.dispatch`): free pages, growth reservations, decode groups, free instances. Requests
     that can never fit are rejected; idle partial prefills (left by another policy) are preempted.
  2. Queue (`esp.queue.QueueDiscipline`, option `queue=deadline`, the default): earliest latency deadline
     first, kept across calls (`esp.deadline_index`). Under overload (the arriving work exceeds
     `target_utilization` x the instances) the largest requests are late: they start only when no timely
     request waits, so the most requests meet their SLOs (served, not rejected, unless `admission=on`
     refuses those past their deadline). When the head does not fit the free instances it gets a
     reservation: a group that is held for it (or drains for it) and that it prefills on once idle; the
     small decodes living on the group's idle members first migrate off it (`plan_evacuation`), so they
     keep decoding elsewhere instead of stalling for the whole prefill. `queue=fifo`: arrival order,
     admission stops at the first request that does not fit, no reservation.
  3. Allocation + dispatching + batching (`esp.allocation`, `esp.batching`): candidate prefill instance
     sets, admission in queue order under memory (with backfilling), the batching DP per candidate (which
     may defer a request to a later step), and the delay-decode cost/gain test choose which instances
     prefill which batches at which DoP. DoPs become concrete aligned groups, ready programs first.
  4. If nothing prefills, consolidation by migration may free a decode instance for the queue.
  5. Scaling plan (`esp.scaling`, `decode_planner`): placement of every prompt's KV (scale-down), then decode
     batches on every other idle instance with masters, scale-up and newest-first preemption.
Prefix cache (`scheduler.prefix`): a waiting request whose cached prefix lies on busy instances that free
sooner than recomputing it would take waits for them; the batching DP prices a request whose cached prefix
lies inside a candidate's instances as its suffix attending to the prefix (so lending the decode group that
holds a document can win); groups holding more reusable prefix are preferred, requests move to the batch
whose group holds their prefix, and placement keeps the suffix beside it (`esp.scaling`).
Prefill and decode groups are only of sizes the cost model prices (`ClusterSnapshot.prefill_sizes`,
`decode_planner.scale_up_scope`). Ablations switch one elastic move off each: `scale_down=0`, `scale_up=0`,
`migration=0`, `max_prefill_degree=1`.
"""

from __future__ import annotations

from loong_jax.scheduler.decode_planner import plan_decodes, scale_up_scope
from loong_jax.scheduler.esp.allocation import BatchingLimits, choose_prefill, plan_consolidation, plan_evacuation
from loong_jax.scheduler.esp.dispatch import ClusterSnapshot, group_pages
from loong_jax.scheduler.esp.queue import QueueDiscipline, fits_free_instances, never_fits_test, reserve_for_head
from loong_jax.scheduler.esp.scaling import place_batch
from loong_jax.scheduler.cost.estimates import prefill_chunks_seconds
from loong_jax.scheduler.groups import free_blocks, pack_sizes
from loong_jax.scheduler.plan import Plan, Preemption, PrefillBatch
from loong_jax.scheduler.policy import PolicyDefaults
from loong_jax.scheduler.prefix import reusable, waits_for_prefix
from loong_jax.scheduler.view import SchedulerView


class EspPolicy(PolicyDefaults):
    name = "esp"

    def __init__(self, max_batches: int = 8, max_boundaries: int = 24, max_admit: int = 256,
                 growth_horizon: int = 512, max_lent_groups: int = 8, migration: bool = True,
                 max_tokens_per_instance: int | None = None, slo_scale: float = 25.0,
                 evacuation_wait: float = 0.2, queue: str = "deadline", target_utilization: float = 0.8,
                 starvation_limit: float = 4.0, scale_down: bool = True, scale_up: bool = True,
                 max_prefill_degree: int | None = None, admission: bool | str = False):
        if max_batches < 1 or max_boundaries < 2 or max_admit < 1 or growth_horizon < 0 or max_lent_groups < 0:
            raise ValueError("EspPolicy: max_batches, max_admit >= 1, max_boundaries >= 2, others >= 0")
        for label, flag in (("migration", migration), ("scale_down", scale_down), ("scale_up", scale_up)):
            if flag not in (0, 1):  # True / False, or 0 / 1 from the command line
                raise ValueError(f"EspPolicy: {label} must be 0 or 1 (true or false), got {flag!r}")
        if max_prefill_degree is not None and (max_prefill_degree < 1 or max_prefill_degree & (max_prefill_degree - 1)):
            raise ValueError(f"EspPolicy: max_prefill_degree must be a power of two >= 1, got {max_prefill_degree!r}")
        self.queue = QueueDiscipline(queue, slo_scale, target_utilization, starvation_limit, admission)
        self.limits = BatchingLimits(max_batches, max_boundaries, max_admit, max_tokens_per_instance,
                                     backfill=self.queue.backfills)
        self.growth_horizon = growth_horizon
        self.max_lent_groups = max_lent_groups
        # The elastic moves, each of which an ablation may switch off: migration (consolidation and
        # evacuation), proactive scale-down after a prefill, decode scale-up onto a new master, and
        # prefill wider than `max_prefill_degree` instances.
        self.migration, self.scale_down, self.scale_up = bool(migration), bool(scale_down), bool(scale_up)
        self.max_prefill_degree = max_prefill_degree
        self.slo_scale = slo_scale
        self.evacuation_wait = evacuation_wait  # wait up to this x the head's prefill for an evacuation target

    def request_token_limits(self, num_instances: int, pages_per_instance: int,
                             page_size: int) -> tuple[int, int] | None:
        """The whole cluster, but a prompt no longer than `max_prefill_degree` instances hold."""
        if self.max_prefill_degree is None or self.max_prefill_degree >= num_instances:
            return None
        cluster = num_instances * pages_per_instance * page_size
        return self.max_prefill_degree * pages_per_instance * page_size, cluster

    def schedule(self, view: SchedulerView) -> Plan:
        if not view.idle_instances:
            return Plan()
        snapshot = self.queue.snapshot(view, self.growth_horizon, self.max_prefill_degree)
        never_fits, cluster_facts = never_fits_test(view, self.limits.max_tokens_per_instance,
                                                    snapshot.prefill_sizes()[-1])
        rejections, queue = self.queue.head(snapshot, never_fits, cluster_facts, self.limits.max_admit)
        queue = [r for r in queue if not waits_for_prefix(r, view)]  # its cached prefix frees soon
        preemptions = [Preemption(r.request_id) for r in view.prefilling if not r.in_flight]
        nothing_running = not view.decoding and not view.prefilling and len(view.idle_instances) == view.num_instances

        reservation, must_run, migrations, mode = None, frozenset(), [], "go"
        if queue and self.queue.backfills and not fits_free_instances(snapshot, queue[0]):
            reservation = reserve_for_head(snapshot, queue[0], self.queue.load.typical_latency())
        if reservation is not None and reservation.fits:
            migrations, mode = self._clear_reservation(snapshot, reservation, queue)
        if reservation is not None:
            if reservation.ready and mode == "go":
                snapshot.release(reservation.group)
                must_run = frozenset([queue[0].request_id])
            else:  # held, being cleared or draining: the head waits; shorter requests backfill elsewhere
                snapshot.withhold(reservation.group)
                queue = queue[1:]

        choice = choose_prefill(snapshot, queue, self.limits, self.max_lent_groups, nothing_running, must_run)
        option = choice.best
        if self.migration and queue and not must_run and not migrations and (option is None or option.lent_groups):
            # Consolidating a decode group may beat both waiting and lending it (a short move, then the
            # freed instance prefills while the group keeps decoding).
            migrations = plan_consolidation(snapshot, queue, self.limits, None if option is None else option.lend_cost)
            if migrations and option is not None:
                option = choice.free_only  # free instances only (consolidation changed nothing it read)
        prefills, used = self._prefills(snapshot, option)
        if migrations:
            moving = {i for m in migrations for i in (m.src_instance, m.dst_instance)}
            used.update(moving)
            used.update(i for g in snapshot.decode_groups if moving & set(g) for i in g)
        allowed = snapshot.idle - used
        decoding = [r for r in view.decoding if not r.in_flight]
        decodes = plan_decodes(view, decoding, allowed, snapshot.pages_free, homes=snapshot.homes,
                               scope_of=scale_up_scope(view, self.scale_up))
        batches = decodes.batches
        if reservation is not None and reservation.fits and not must_run and mode != "drain":
            # Held members only run a decode step that ends before the busy members free (none while
            # their decodes wait to be evacuated).
            held, until = set(reservation.group), 0.0 if mode == "hold" else reservation.ready_in
            batches = [b for b in batches if not held.intersection(b.group) or b.estimated_s < until]
        return Plan(
            prefills=tuple(prefills), decodes=tuple(batches), migrations=tuple(migrations),
            preemptions=tuple(preemptions) + tuple(decodes.preemptions), rejections=rejections,
        )

    def _clear_reservation(self, snapshot: ClusterSnapshot, reservation, queue) -> tuple[list, str]:
        """(migrations, mode) that keep the reserved group's decodes from stalling for the head's prefill.

        Evacuate single-instance homes to instances outside the group; or wait a moment ("hold": the group
        starts nothing) for a destination to come idle when their stall outweighs the head's wait; or
        consolidate a wider decode group so that an instance comes free for the head instead. Mode "go":
        the head may prefill once the group is idle; "drain": its decodes run on and it waits (decode
        groups are never lent with `max_lent_groups=0`)."""
        head, members = queue[0], set(reservation.group)
        stalled = [r for r in snapshot.view.decoding if members.intersection(snapshot.homes[r.request_id])]
        if not stalled:
            return [], "go"
        if not self.migration:
            return [], "go" if self.max_lent_groups else "drain"
        seconds = snapshot.prefill_seconds(head, len(reservation.group))
        migrations, wait_for_target = plan_evacuation(snapshot, reservation.group, seconds)
        for move in migrations:
            snapshot.withhold((move.dst_instance,))
        if migrations:
            return migrations, "hold"
        stall_cost = seconds * snapshot.urgency(stalled)
        if 0 < wait_for_target < self.evacuation_wait * seconds:
            if wait_for_target * snapshot.urgency(queue[:1]) < stall_cost:
                return [], "hold"
        if not self.max_lent_groups:
            return plan_consolidation(snapshot, queue, self.limits), "drain"
        if reservation.ready:  # merging a wider decode group may free an instance at less cost
            migrations = plan_consolidation(snapshot, queue, self.limits, stall_cost, across_singles=False)
        return migrations, "hold" if migrations else "go"

    def _prefills(self, snapshot: ClusterSnapshot, option):
        """Prefill batches of the chosen option and the instances they (and lent decode groups) occupy."""
        view = snapshot.view
        if option is None:
            return [], set()
        used = set(i for g in option.lent_groups for i in g)
        choices = list(option.batching.batches)
        groups = pack_sizes([c.dop for c in choices], free_blocks(option.instances, view.num_instances))
        if groups is None:
            return [], set()
        groups = self._match_groups(snapshot, choices, groups, option.admitted, option.instances)
        batches = _join_cached_prefixes([[option.admitted[i] for i in c.indices] for c in choices], groups)
        prefills = []
        for requests, group in zip(batches, groups):
            if not requests:
                continue
            placed, _ = place_batch(snapshot, group, requests, self.scale_down)
            if not placed:
                continue
            used.update(group)
            chunks = tuple((start, r.prefill_target - start) for r, start, _ in placed)
            estimate = prefill_chunks_seconds(view.cost_model, len(group), chunks)
            kind = "prefill_context" if any(start for start, _ in chunks) else "prefill"
            estimate += view.compile_penalty_s(kind, group, sum(length for _, length in chunks))
            prefills.append(PrefillBatch(
                group=group,
                request_ids=tuple(r.request_id for r, _, _ in placed),
                chunks=chunks,
                placement=tuple(segments for _, _, segments in placed),
                estimated_s=estimate,
            ))
        if not prefills:  # nothing prefills after all: lent decode groups keep decoding
            return [], set()
        return prefills, used

    @staticmethod
    def _match_groups(snapshot: ClusterSnapshot, choices, groups, admitted, instances):
        """Move each batch (largest DoP, then most tokens first) to the best family group of its size that is
        free of the others: a ready program first, then the most cached prompt tokens it can reuse, then the
        most free pages."""
        view = snapshot.view
        family = [g for g in view.group_family if set(g) <= instances]
        tokens = [sum(admitted[i].prefill_target for i in c.indices) for c in choices]
        result = list(groups)

        def reused(choice, group) -> int:
            return sum(admitted[i].cached_tokens for i in choice.indices if reusable(admitted[i], group))

        for k in sorted(range(len(result)), key=lambda k: (-len(result[k]), -tokens[k])):
            taken = {i for j, g in enumerate(result) if j != k for i in g}
            options = [g for g in family if len(g) == len(result[k]) and not taken.intersection(g)]
            result[k] = min(options, key=lambda g: (not view.program_ready("prefill", g, tokens[k]),
                                                    -reused(choices[k], g), -group_pages(snapshot, g), g))
        return result


def _join_cached_prefixes(batches: list[list], groups: list[tuple[int, ...]]) -> list[list]:
    """Move each request whose cached prefix its batch's group misses into a batch whose group holds it (a
    suffix prefill there costs less than computing the prompt again)."""
    moved = [list(batch) for batch in batches]
    for k, batch in enumerate(batches):
        for request in batch:
            if request.cached_tokens and not reusable(request, groups[k]):
                home = next((j for j, group in enumerate(groups) if reusable(request, group)), None)
                if home is not None:
                    moved[k].remove(request)
                    moved[home].append(request)
    return moved
