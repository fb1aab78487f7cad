"""`loong-jax simulate`: run policies on a simulated cluster and report max throughput under the SLO.

Data flow:
  1. Parse arguments; build the workload (synthetic generator or trace file) once, so every policy and every
     rate serves the same requests (only the arrival times scale with the rate).
  2. Load the cost model (default: the shipped, projected H200 Llama-2-7B file) for the chosen `--tp`; one
     without a migration term (profiled on one instance) is refused for more than one instance.
  3. For each policy: with `--request-rates`, run every listed rate to completion; without, search the rate
     (doubling, then bisection) until the SLO attainment crosses the target (the finite-run max rate). Then,
     unless `--steady-requests 0`, the figures a finite run cannot flatter (`steady.py`): the max sustainable
     rate (searched from the lower of the capacity bound and the finite-run max rate) and complete steady-state
     runs at the finite-run max rate and at every listed rate. A tqdm bar counts the runs.
  4. Print the tables (finite-run max rate per policy, ESP / best baseline; then finite-run max rate,
     sustainable rate, capacity bound and the steady-state figures), write `--json` and `--plot` if asked.

The SLO is 25x isolated latency (`--slo-scale`), or LoongServe's per-token form with
`--slo-input-ms-per-token` and `--slo-output-ms-per-token`. Policy option strings (`replicas:queue=deadline`)
pass through to `make_policy` unchanged and label the rows.

Examples (wall times on a shared 2-core CPU):
  loong-jax simulate --workload leval --instances 8 --policies esp,replicas --num-requests 150 --plot-rates 0
      (about a minute: the rate search only)
  loong-jax simulate --workload mixed --instances 8 --tp 1 --policies esp,chunked-prefill,pd-disagg \
      --num-requests 300 --json mixed.json --plot mixed.png  (several minutes: search plus plotted rates)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from loong_jax.engine.prefix_cache import PrefixCacheOptions
from loong_jax.scheduler.cost.model import DEFAULT_COST_MODEL_PATH, CostModel
from loong_jax.scheduler.policy import PolicySpec, policy_names
from loong_jax.simulator.metrics import DEFAULT_ATTAINMENT_TARGET, DEFAULT_SLO_SCALE, SloSpec, isolated_latencies
from loong_jax.simulator.report import ExperimentResult, PolicyResult, format_table, plot_experiment
from loong_jax.simulator.run import RatePoint, initial_rate_guess, search_max_rate, simulate
from loong_jax.simulator.steady import SteadyPoint, capacity_bound, search_sustainable_rate, simulate_steady
from loong_jax.simulator.workloads import DOCUMENT_ARRIVALS, WORKLOADS, Workload, load_trace, make_workload

DEFAULT_POLICIES = "esp,chunked-prefill,pd-disagg,static-sp,replicas"  # ESP and the four baselines


def _rates(text: str) -> list[float]:
    rates = [float(x) for x in text.replace(",", " ").split()]
    if not rates or any(r <= 0 for r in rates):
        raise argparse.ArgumentTypeError(f"request rates must be positive numbers, got {text!r}")
    return rates


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loong-jax simulate",
        description="Simulate serving policies on N instances with a cost model; report max throughput under SLO.",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--workload", choices=WORKLOADS, default="sharegpt", help="synthetic workload")
    source.add_argument("--trace", type=Path, help="CSV or JSONL of arrival,input_len,output_len")
    parser.add_argument("--zipf-alpha", type=float, default=1.0, help="exponent of the zipf workload")
    parser.add_argument("--questions-per-document", type=int, default=4,
                        help="questions on each shared document (leval-docs, lveval-docs)")
    parser.add_argument("--document-arrivals", choices=DOCUMENT_ARRIVALS, default="close",
                        help="a document's questions arrive in a burst (close) or scattered over the run (spread)")
    parser.add_argument("--no-prefix-cache", action="store_true",
                        help="recompute every prompt (default: reuse cached KV pages of shared documents)")
    parser.add_argument("--instances", type=int, default=8, help="model instances in the cluster")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel devices per instance")
    parser.add_argument("--cost-model", type=Path, default=DEFAULT_COST_MODEL_PATH, help="cost-model JSON")
    parser.add_argument("--policies", default=DEFAULT_POLICIES,
                        help=f"comma list of {', '.join(policy_names())}; options as name:key=value, "
                             "e.g. static-sp:degree=4")
    parser.add_argument("--request-rates", type=_rates, default=None,
                        help="rates to run (req/s, comma or space separated); default: automatic search")
    parser.add_argument("--num-requests", type=int, default=300, help="requests per run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--slo-scale", type=float, default=DEFAULT_SLO_SCALE, help="SLO = scale x isolated latency")
    parser.add_argument("--slo-input-ms-per-token", type=float, default=None,
                        help="LoongServe's SLO form (with --slo-output-ms-per-token; replaces --slo-scale): a request "
                             "meets it when TTFT / input tokens <= this many ms")
    parser.add_argument("--slo-output-ms-per-token", type=float, default=None,
                        help="LoongServe's SLO form: ... and (finish - first token) / (output tokens - 1) <= this many ms")
    parser.add_argument("--steady-requests", type=int, default=None,
                        help="requests per steady-state run (default: --num-requests; 0: no steady-state figures); "
                             "the middle half of their arrivals is judged")
    parser.add_argument("--attainment", type=float, default=DEFAULT_ATTAINMENT_TARGET, help="SLO attainment target")
    parser.add_argument("--precision", type=float, default=0.05, help="relative precision of the rate search")
    parser.add_argument("--plot-rates", type=int, default=5,
                        help="after the search, complete runs of every policy at this many common rates (0: none)")
    parser.add_argument("--hide-output-lengths", action="store_true",
                        help="do not tell policies each request's output length (max_new_tokens unknown)")
    parser.add_argument("--async-scheduling", action="store_true",
                        help="plan each decode step while the last one runs, as the engine serves by default "
                             "(needs the output lengths revealed)")
    parser.add_argument("--json", type=Path, help="write all results as JSON here")
    parser.add_argument("--plot", type=Path, help="write latency-vs-rate plots (PNG) here")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def prefix_cache_of(args) -> PrefixCacheOptions:
    return PrefixCacheOptions(enabled=not args.no_prefix_cache)


def _workload(args, num_requests: int | None = None) -> Workload:
    count = args.num_requests if num_requests is None else num_requests
    if args.trace is not None:
        return load_trace(args.trace, count)
    return make_workload(args.workload, count, args.seed, args.zipf_alpha, args.questions_per_document,
                         args.document_arrivals)


def _workload_stats(workload: Workload, isolated: np.ndarray) -> dict:
    return {
        "name": workload.name,
        "num_requests": len(workload),
        "input_len_mean": float(workload.input_lens.mean()),
        "input_len_max": int(workload.input_lens.max()),
        "output_len_mean": float(workload.output_lens.mean()),
        "isolated_latency_mean_s": float(isolated.mean()),
    }


def slo_of(args) -> SloSpec:
    per_token = (args.slo_input_ms_per_token, args.slo_output_ms_per_token)
    try:
        if per_token == (None, None):
            return SloSpec(args.slo_scale)
        return SloSpec(args.slo_scale, *(None if v is None else v / 1e3 for v in per_token))
    except ValueError as error:
        raise SystemExit(f"loong-jax simulate: error: {error}") from None


def run_policies(args, workload: Workload, cost_model: CostModel, progress,
                 steady_workload: Workload | None = None) -> dict[str, PolicyResult]:
    probe = workload.requests(1.0)
    isolated = isolated_latencies(probe, cost_model, args.instances)
    specs = [PolicySpec.parse(text) for text in args.policies.split(",")]
    results: dict[str, PolicyResult] = {}
    slo = slo_of(args)

    def run(spec: PolicySpec, rate: float, give_up: bool) -> RatePoint:
        progress.set_postfix_str(f"{spec.label} @ {rate:.3g} req/s")
        point = simulate(workload.requests(rate), spec, cost_model, args.instances, request_rate=rate, slo=slo,
                         give_up_below=args.attainment if give_up else None,
                         reveal_output_lengths=not args.hide_output_lengths, isolated=isolated,
                         prefix_cache=prefix_cache_of(args), async_scheduling=args.async_scheduling)
        progress.update(1)
        return point

    for spec in specs:
        points: dict[float, RatePoint] = {}

        def attainment(rate: float, give_up: bool) -> float:
            points[rate] = run(spec, rate, give_up)
            return points[rate].metrics.slo_attainment

        # Every request at t = 0: the cluster's drain rate under this policy (its saturation throughput).
        burst = run(spec, math.inf, give_up=False)
        if args.request_rates:
            passing = [rate for rate in args.request_rates if attainment(rate, give_up=False) >= args.attainment]
            max_rate = max(passing) if passing else None
        elif burst.metrics.slo_attainment >= args.attainment:
            max_rate = math.inf  # N requests meet the SLO however fast they come: nothing to search
        else:
            start = burst.metrics.throughput or initial_rate_guess(probe, isolated, args.instances)
            found = search_max_rate(lambda rate: attainment(rate, give_up=True), start, args.attainment, args.precision)
            max_rate = found if found > 0 else None
        results[spec.label] = PolicyResult(spec.label, max_rate, list(points.values()), burst)
        if steady_workload is not None:
            steady_figures(args, spec, results[spec.label], steady_workload, cost_model, slo, progress)

    finite = [r.max_rate for r in results.values() if r.max_rate is not None and math.isfinite(r.max_rate)]
    if not finite:  # every policy unbounded (or none passes): centre the curves on the saturation throughputs
        finite = [r.saturation_throughput for r in results.values() if r.saturation_throughput]
    if not args.request_rates and args.plot_rates > 0 and finite:
        # Complete runs on one common grid around the knees, so that every policy has a full latency curve.
        grid = np.geomspace(0.5 * min(finite), 1.25 * max(finite), args.plot_rates)
        for spec in specs:
            result = results[spec.label]
            for rate in grid:
                result.points.append(run(spec, float(rate), give_up=False))
    return results


def steady_figures(args, spec: PolicySpec, result: PolicyResult, workload: Workload, cost_model: CostModel,
                   slo: SloSpec, progress) -> None:
    """Max sustainable rate (search from the lower of the capacity bound and the finite-run max rate), and complete
    steady-state runs at the finite-run max rate and at every listed --request-rates rate."""
    probe = workload.requests(1.0)
    isolated = isolated_latencies(probe, cost_model, args.instances)
    bound = capacity_bound(probe, cost_model, args.instances, prefix_cache=not args.no_prefix_cache)
    points: dict[float, SteadyPoint] = {}

    def run(rate: float, give_up: bool) -> SteadyPoint:
        if rate in points and (points[rate].complete or give_up):
            return points[rate]
        progress.set_postfix_str(f"{spec.label} steady @ {rate:.3g} req/s")
        points[rate] = simulate_steady(workload.requests(rate), spec, cost_model, args.instances, request_rate=rate,
                                       slo=slo, isolated=isolated, target=args.attainment, give_up=give_up,
                                       reveal_output_lengths=not args.hide_output_lengths,
                                       prefix_cache=prefix_cache_of(args), async_scheduling=args.async_scheduling)
        progress.update(1)
        return points[rate]

    finite = result.max_rate if result.max_rate is not None and math.isfinite(result.max_rate) else math.inf
    start = min(bound, finite) if finite > 0 else bound
    found = search_sustainable_rate(lambda rate: run(rate, give_up=True), start, args.precision, ceiling=bound)
    result.sustainable_rate = found if found > 0 else None
    for rate in [finite] + list(args.request_rates or []):
        if math.isfinite(rate):
            run(rate, give_up=False)
    result.steady_points = sorted(points.values(), key=lambda p: p.request_rate)


def simulate_main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.instances < 1 or args.tp < 1 or args.num_requests < 1:
        raise SystemExit("--instances, --tp and --num-requests must be >= 1")
    if args.async_scheduling and args.hide_output_lengths:
        raise SystemExit("--async-scheduling needs the output lengths revealed (drop --hide-output-lengths)")
    cost_model = CostModel.load_json(args.cost_model, tp=args.tp)
    try:
        cost_model.check_instances(args.instances)  # a one-instance profile cannot price migrations
    except ValueError as error:
        raise SystemExit(f"loong-jax simulate: error: {error}") from None
    workload = _workload(args)
    steady_count = args.num_requests if args.steady_requests is None else args.steady_requests
    if steady_count < 0 or steady_count == 1:
        raise SystemExit("--steady-requests must be 0 (off) or at least 2")
    steady_workload = None
    if steady_count:
        steady_workload = workload if steady_count == args.num_requests else _workload(args, steady_count)
    from tqdm import tqdm

    with tqdm(desc="simulate", unit="run", disable=True if args.no_progress else None, file=sys.stderr) as progress:
        policies = run_policies(args, workload, cost_model, progress, steady_workload)
    isolated = isolated_latencies(workload.requests(1.0), cost_model, args.instances)
    bound_workload = steady_workload or workload
    stats = _workload_stats(workload, isolated)
    stats["capacity_bound"] = capacity_bound(bound_workload.requests(1.0), cost_model, args.instances,
                                             prefix_cache=not args.no_prefix_cache)
    stats["capacity_bound_requests"] = len(bound_workload)
    config = {
        "workload": workload.name,
        "trace": None if args.trace is None else str(args.trace),
        "instances": args.instances,
        "tp": args.tp,
        "cost_model": str(args.cost_model),
        "cost_model_provenance": cost_model.provenance,
        "num_requests": len(workload),
        "seed": args.seed,
        "slo_scale": args.slo_scale,
        "slo": slo_of(args).to_dict(),
        "steady_requests": steady_count,
        "attainment_target": args.attainment,
        "request_rates": args.request_rates,
        "output_lengths_revealed": not args.hide_output_lengths,
        "async_scheduling": args.async_scheduling,
    }
    result = ExperimentResult(config, stats, policies)
    print(f"workload {workload.name}: {len(workload)} requests ({steady_count} per steady-state run), "
          f"{args.instances} instances x tp {args.tp}, cost model {args.cost_model.name} ({cost_model.provenance}), "
          f"SLO {slo_of(args).label}")
    print(format_table(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result.to_dict(), indent=1) + "\n")
    if args.plot:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        plot_experiment(result, args.plot, title=f"{workload.name}, {args.instances} instances x tp {args.tp}")
    return 0


if __name__ == "__main__":
    raise SystemExit(simulate_main())
