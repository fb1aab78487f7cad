"""Headline simulation: every workload, every policy, 8 instances x tp 1, projected H200 Llama-2-7B cost model.

Data flow:
  1. For each workload, run `loong-jax simulate` (`simulate_main`) with the automatic rate search and write
     `results/sim_<workload>.json` and `results/sim_<workload>.png` (latency and SLO attainment vs rate).
  2. Read the JSON files back and write `results/simulation_h200.md`: max throughput under the SLO per policy,
     ESP / each baseline, ESP / best baseline, and the saturation throughput (all requests at t = 0).

Run: python benchmarks/simulate_h200.py [--workloads sharegpt,leval,...] [--num-requests 1000] [--jobs 2]
[--replot]. `--jobs N` searches a workload's policies in N processes; runs of different workloads into the
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


def summary_markdown(documents: dict[str, dict]) -> str:
    policies = list(next(iter(documents.values()))["policies"])
    lines = [
        "| workload | " + " | ".join(policies) + " | ESP / best baseline | ESP / best at saturation |",
        "| --- | " + " | ".join("---" for _ in policies) + " | --- | --- |",
    ]
    for workload, document in documents.items():
        summary = document["summary"]
        cells = []
        for label in policies:
            rate = _rate(summary["max_throughput"][label])
            saturation = summary["saturation_throughput"][label]
            rejected = summary.get("rejected_at_saturation", {}).get(label, 0)
            extra = f", {rejected} rejected" if rejected else ""
            cells.append(f"{rate} ({saturation:.2f}{extra})" if saturation is not None else rate)
        best = f"{_ratio(summary.get('esp_over_best_baseline'))} vs {summary.get('best_baseline')}"
        lines.append(f"| {workload} | " + " | ".join(cells) + f" | {best} | "
                     f"{_ratio(summary.get('esp_over_best_baseline_saturation'))} |")
    lines.append("")
    lines.append("Cells: max request rate (req/s) with >= 90% of requests within 25x their isolated latency "
                 "(saturation throughput in req/s: all requests at t = 0, in parentheses, with the requests the "
                 "policy rejected as larger than any group it may use; ESP / best at saturation only compares "
                 "baselines that rejected no more requests than ESP).")
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
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    documents = {}
    for workload in args.workloads.split(","):
        if args.replot:
            json_path = args.out / f"sim_{workload}.json"
            result = load_experiment(json_path)
            plot_experiment(result, args.out / f"sim_{workload}.png",
                            title=f"{result.config['workload']}, 8 instances x tp 1")
            documents[workload] = json.loads(json_path.read_text())
            continue
        started = time.perf_counter()
        count = args.sharegpt_requests if workload == "sharegpt" else args.num_requests
        json_path, png_path = args.out / f"sim_{workload}.json", args.out / f"sim_{workload}.png"
        common = ["--workload", workload, "--instances", "8", "--tp", "1", "--num-requests", str(count),
                  "--seed", str(args.seed), "--plot-rates", str(args.plot_rates), "--precision", str(args.precision),
                  "--no-progress"]
        run_workload(workload, args.policies.split(","), common, json_path, args.jobs)
        result = load_experiment(json_path)
        plot_experiment(result, png_path, title=f"{workload}, 8 instances x tp 1")
        documents[workload] = json.loads(json_path.read_text())
        print(f"[{workload}: {time.perf_counter() - started:.0f} s]\n", flush=True)
    table = summary_markdown(documents)
    (args.out / "simulation_h200.md").write_text(
        "# Simulation: 8 H200 instances (tp 1), Llama-2-7B, PROJECTED cost model\n\n" + table + "\n"
    )
    print(table)


if __name__ == "__main__":
    main()
