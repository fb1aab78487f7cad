"""Headline simulation: every workload, every policy, 8 instances x tp 1, projected H200 Llama-2-7B cost model.

Data flow:
  1. For each workload, run `loong-jax simulate` (`simulate_main`) with the automatic rate search and write
     `results/sim_<workload>.json` and `results/sim_<workload>.png` (latency and SLO attainment vs rate).
  2. Read the JSON files back and write `results/simulation_h200.md` (`_<N>i` suffixes for N != 8 instances):
     one table per workload, a row per policy: finite-run max rate, max sustainable rate, capacity bound,
     rejected + unserved shares, steady-state figures at the finite-run max rate, saturation throughput; and
     ESP / best baseline by both rates.

Run: python benchmarks/simulate_h200.py [--workloads sharegpt,leval,...] [--num-requests 1000]
[--steady-requests 4000] [--instances 8] [--slo-ms-per-token IN,OUT] [--jobs 2] [--replot]. Policies take option
strings (`replicas:queue=deadline`), passed through unchanged. `--jobs N` searches a workload's policies in N processes; runs of different workloads into the
same --out may also go in parallel, then `--replot` writes the table of all of them.

Why 1,000 requests per rate (8 to 25 minutes per workload on a shared 2-core machine): with an SLO of 25x
the isolated latency a finite run only fails once its backlog exceeds ~25 isolated latencies of work, so
with 300 long requests the search finds rates up to 2x the cluster's real capacity (finite-run artefact);
1,000 bring the max rate close to the saturation throughput. ShareGPT needs --sharegpt-requests (20,000):
its 25x SLO (about 40 s) is longer than draining thousands of chat requests (with 2,000 every policy met it
even when all arrived at once, so no rate was too high), and at 20,000 a backlog finally outlasts it
(slow: with --jobs 2 --precision 0.1 --plot-rates 0 on a 2-core machine, replicas and chunked-prefill took
57 minutes, ESP 10, and static-sp with pd-disagg over 110).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from loong_jax.simulator.cli import simulate_main
from loong_jax.simulator.report import ExperimentResult, load_experiment, plot_experiment

RESULTS = Path(__file__).resolve().parent / "results"
POLICIES = "esp,static-sp,replicas,chunked-prefill,pd-disagg"
WORKLOADS = ("sharegpt", "leval", "lveval", "mixed", "zipf")


def _rate(value) -> str:
    if value is None:
        return "none"
    if value == "inf":
        return "unbounded"
    return f"{value:.3f}"


def _ratio(value) -> str:
    if value is None:
        return "—"
    return "inf" if value == "inf" else f"{value:.2f}x"


def _share(point: dict | None) -> str:
    if point is None:
        return "—"
    return f"{100 * point['rejected_share']:.1f} + {100 * point['unserved_share']:.1f}%"


def _steady_at(entry: dict, rate) -> dict | None:
    return next((p for p in entry.get("steady_points", []) if p["complete"] and p["request_rate"] == rate), None)


def summary_markdown(documents: dict[str, dict]) -> str:
    """One table per workload: a row per policy with the finite-run max rate, the max sustainable rate, the
    capacity bound and the steady-state figures at both rates (see loong_jax/simulator/steady.py)."""
    lines = []
    for workload, document in documents.items():
        summary, config = document["summary"], document["config"]
        bound = summary.get("capacity_bound")
        lines += [
            (f"### {workload}: {config['instances']} instances x tp {config['tp']}, {config['num_requests']} "
             f"requests per finite run, {config.get('steady_requests')} per steady-state run"),
            "",
            ("| policy | finite-run max rate | max sustainable rate | capacity bound | rejected + unserved at "
             "sustainable | at finite max: middle attainment | backlog growth (req/s) | rejected + unserved | "
             "saturation |"),
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for label, entry in document["policies"].items():
            at_max = _steady_at(entry, entry["max_throughput"])
            sustainable = entry.get("max_sustainable_rate")
            growth = "—" if at_max is None or at_max["backlog_growth_per_s"] is None else (
                f"{at_max['backlog_growth_per_s']:+.3f}{' (growing)' if at_max['backlog_growing'] else ''}")
            saturation = entry.get("saturation_throughput")
            middle = "—" if at_max is None else f"{100 * at_max['middle_attainment']:.1f}%"
            lines.append(
                f"| {label} | {_rate(entry['max_throughput'])} | {_rate(sustainable)} | "
                f"{'—' if bound is None else f'{bound:.3f}'} | {_share(_steady_at(entry, sustainable))} | "
                f"{middle} | {growth} | "
                f"{_share(at_max)} | {'—' if saturation is None else f'{saturation:.3f}'} |")
        lines.append("")
        lines.append(f"ESP / best baseline: finite-run {_ratio(summary.get('esp_over_best_baseline'))} vs "
                     f"{summary.get('best_baseline')}; sustainable "
                     f"{_ratio(summary.get('esp_over_best_baseline_sustainable'))} vs "
                     f"{summary.get('best_baseline_sustainable')}")
        lines.append("")
    lines.append("Finite-run max rate: highest rate (req/s) at which >= 90% of a finite run's requests meet the SLO. "
                 "Max sustainable rate: highest rate with >= 90% attainment over the middle half of a long run's "
                 "arrivals and no growing backlog. Capacity bound: the rate at which serving every request uses all "
                 "instance-seconds (cost model, perfect batching). Rejected + unserved: shares of the requests "
                 "arrived by the end of the middle window that were rejected, and unfinished when the run stopped. "
                 "Saturation: requests/s drained when all arrive at t = 0.")
    return "\n".join(lines)


def run_workload(workload: str, policies: list[str], common: list[str], json_path: Path, jobs: int) -> None:
    """`loong-jax simulate` of one workload; with jobs > 1 the policies run in that many processes (each
    policy's runs are independent) and their results are merged into one JSON file."""
    if jobs <= 1:
        simulate_main(common + ["--policies", ",".join(policies), "--json", str(json_path)])
        return
    parts = [policies[k::jobs] for k in range(min(jobs, len(policies)))]
    spawn = multiprocessing.get_context("spawn")  # no fork of a process that may hold JAX's threads
    with tempfile.TemporaryDirectory() as scratch, ProcessPoolExecutor(len(parts), mp_context=spawn) as pool:
        paths = [Path(scratch) / f"part{k}.json" for k in range(len(parts))]
        futures = [pool.submit(simulate_main, common + ["--policies", ",".join(part), "--json", str(path)])
                   for part, path in zip(parts, paths)]
        for future in futures:
            future.result()
        experiments = [load_experiment(path) for path in paths]
    results = {label: result for experiment in experiments for label, result in experiment.policies.items()}
    first = experiments[0]
    merged = ExperimentResult(first.config, first.workload_stats, {label: results[label] for label in policies})
    json_path.write_text(json.dumps(merged.to_dict(), indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--policies", default=POLICIES)
    parser.add_argument("--num-requests", type=int, default=1000)
    parser.add_argument("--sharegpt-requests", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precision", type=float, default=0.05, help="relative precision of the rate search")
    parser.add_argument("--plot-rates", type=int, default=5, help="common rates of complete runs for the plots")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--replot", action="store_true", help="only redraw plots and the table from the JSON files")
    parser.add_argument("--jobs", type=int, default=1, help="processes per workload (policies run in parallel)")
    parser.add_argument("--instances", type=int, default=8)
    parser.add_argument("--steady-requests", type=int, default=4000,
                        help="requests per steady-state run (0: no steady-state figures)")
    parser.add_argument("--slo-ms-per-token", default=None, metavar="INPUT,OUTPUT",
                        help="LoongServe's per-token SLO (ms per input token, ms per output token) instead of 25x")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    documents = {}
    suffix = "" if args.instances == 8 else f"_{args.instances}i"  # 8 instances keep the historical names
    title = f"{args.instances} instances x tp 1"
    slo = []
    if args.slo_ms_per_token:
        input_ms, output_ms = args.slo_ms_per_token.split(",")
        slo = ["--slo-input-ms-per-token", input_ms, "--slo-output-ms-per-token", output_ms]
    for workload in args.workloads.split(","):
        json_path, png_path = args.out / f"sim_{workload}{suffix}.json", args.out / f"sim_{workload}{suffix}.png"
        if args.replot:
            result = load_experiment(json_path)
            plot_experiment(result, png_path, title=f"{result.config['workload']}, {title}")
            documents[workload] = json.loads(json_path.read_text())
            continue
        started = time.perf_counter()
        count = args.sharegpt_requests if workload == "sharegpt" else args.num_requests
        steady = max(args.steady_requests, count) if args.steady_requests else 0
        common = ["--workload", workload, "--instances", str(args.instances), "--tp", "1", "--num-requests",
                  str(count), "--steady-requests", str(steady), "--seed", str(args.seed), "--plot-rates",
                  str(args.plot_rates), "--precision", str(args.precision), "--no-progress", *slo]
        run_workload(workload, args.policies.split(","), common, json_path, args.jobs)
        result = load_experiment(json_path)
        plot_experiment(result, png_path, title=f"{workload}, {title}")
        documents[workload] = json.loads(json_path.read_text())
        print(f"[{workload}: {time.perf_counter() - started:.0f} s]\n", flush=True)
    table = summary_markdown(documents)
    (args.out / f"simulation_h200{suffix}.md").write_text(
        f"# Simulation: {args.instances} H200 instances (tp 1), Llama-2-7B, PROJECTED cost model\n\n" + table + "\n"
    )
    print(table)


if __name__ == "__main__":
    main()
