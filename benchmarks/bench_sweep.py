"""Bench sweep on 8 CPU devices: the demo model served by `loong-jax serve` under the Mixed workload scaled
down, at a few request rates, once per scheduling policy (esp, chunked-prefill, pd-disagg).

    python benchmarks/bench_sweep.py --out-dir benchmarks/results/sweep

Data flow:
  1. For each policy: start `python -m loong_jax.entrypoints.cli serve --port 0 --policy P` with 8 simulated CPU devices
     (`--xla_force_host_platform_device_count=8`), read the bound port from its first stdout line.
  2. Run `loong-jax bench` in this process against it (`bench_main`: Mixed workload, `--length-scale` for
     inputs and `--output-length-scale` for outputs, the same seeded requests and arrival pattern for every
     policy and rate; one untimed `--warmup-pass` first, so first-time compilations are not measured),
     writing `<policy>.json`.
  3. Stop the server (SIGTERM: it drains and exits). A policy the server cannot run (it fails to start or
     never becomes ready) is recorded with the server's last error lines instead of figures.
  4. Write `sweep.json` (every policy's results, the machine, the load average before and after) and
     `sweep.png` (latency against rate, one line per policy), and print a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Sequence

from loong_jax.bench.cli import bench_main
from loong_jax.bench.report import plot_sweep

SERVING_PREFIX = "loong-jax serving on "


def start_server(policy: str, devices: int, extra: Sequence[str], log_path: Path, wait_s: float):
    """The server process and its port, or (process, None) when it did not come up."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"}
    command = [sys.executable, "-m", "loong_jax.entrypoints.cli", "serve", "--port", "0", "--policy", policy, *extra]
    log = log_path.open("w")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    found: dict = {}

    def read_port():
        for line in process.stdout:
            if line.startswith(SERVING_PREFIX) and "port" not in found:
                found["port"] = int(line.rsplit(":", 1)[1])

    reader = threading.Thread(target=read_port, daemon=True)
    reader.start()
    deadline = time.monotonic() + wait_s
    while "port" not in found and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    return process, found.get("port")


def stop_server(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def tail(path: Path, lines: int = 8) -> list[str]:
    return path.read_text(errors="replace").splitlines()[-lines:] if path.exists() else []


def _cell(value, spec: str, width: int) -> str:
    return f"{'n/a':>{width}}" if value is None else f"{value:>{width}{spec}}"


def format_table(summary: dict) -> str:
    columns = (("request_throughput", "req/s", ".2f"), ("output_throughput", "out tok/s", ".1f"),
               ("mean_ttft_ms", "TTFT ms", ".0f"), ("mean_tpot_ms", "TPOT ms", ".0f"),
               ("mean_normalized_latency_s", "norm s/tok", ".3f"), ("slo_attainment", "SLO", ".2f"))
    lines = [f"{'policy':<18}{'rate':>6}" + "".join(f"{title:>11}" for _, title, _ in columns)]
    for policy, entry in summary["policies"].items():
        if "error" in entry:
            lines.append(f"{policy:<18} {entry['error'][:100]}")
            continue
        for result in entry["results"]:
            lines.append(f"{policy:<18}{result['request_rate']:>6}"
                         + "".join(_cell(result.get(key), spec, 11) for key, _, spec in columns))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policies", default="esp,chunked-prefill,pd-disagg")
    parser.add_argument("--request-rates", default="0.5,1,2")
    parser.add_argument("--num-prompts", type=int, default=40)
    parser.add_argument("--length-scale", type=float, default=0.02)
    parser.add_argument("--output-length-scale", type=float, default=0.1)
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--goodput", nargs="+", default=["ttft:5000", "tpot:500"])
    parser.add_argument("--no-warmup-pass", dest="warmup_pass", action="store_false",
                        help="measure with first-time compilations included (by default the workload is sent "
                             "once, untimed, first)")
    parser.add_argument("--server-args", default="", help="extra flags for `loong-jax serve`, one string")
    parser.add_argument("--wait-for-server", type=float, default=900.0, help="seconds for start-up and warm-up")
    parser.add_argument("--out-dir", type=Path, default=Path("benchmarks/results/sweep"))
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    summary: dict = {"machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                                 "load_average_before": list(os.getloadavg())},
                     "workload": {"name": "mixed", "num_prompts": args.num_prompts,
                                  "length_scale": args.length_scale,
                                  "output_length_scale": args.output_length_scale,
                                  "request_rates": args.request_rates, "seed": args.seed, "goodput": args.goodput},
                     "devices": args.devices, "policies": {}}
    runs = {}
    for policy in [p.strip() for p in args.policies.split(",") if p.strip()]:
        log_path = args.out_dir / f"{policy}.server.log"
        started = time.monotonic()
        process, port = start_server(policy, args.devices, args.server_args.split(), log_path,
                                     args.wait_for_server)
        entry: dict = {"server_log": str(log_path)}
        try:
            if port is None:
                entry["error"] = "server did not start: " + " | ".join(tail(log_path))
            else:
                out = args.out_dir / f"{policy}.json"
                code = bench_main(["--port", str(port), "--workload", "mixed",
                                   "--num-prompts", str(args.num_prompts),
                                   "--length-scale", str(args.length_scale),
                                   "--output-length-scale", str(args.output_length_scale),
                                   "--request-rates", args.request_rates, "--seed", str(args.seed),
                                   "--wait-for-server", str(args.wait_for_server), "--label", policy,
                                   "--json", str(out), "--goodput", *args.goodput,
                                   *(["--warmup-pass"] if args.warmup_pass else [])])
                entry["bench_exit_code"] = code
                if out.exists():
                    document = json.loads(out.read_text())
                    entry["results"] = document["results"] if "results" in document else [document]
                    runs[policy] = [{**r, "request_rate": float(r["request_rate"])} for r in entry["results"]]
                else:
                    entry["error"] = "bench failed: " + " | ".join(tail(log_path))
        finally:
            stop_server(process)
        entry["wall_s"] = time.monotonic() - started
        summary["policies"][policy] = entry
    summary["machine"]["load_average_after"] = list(os.getloadavg())
    (args.out_dir / "sweep.json").write_text(json.dumps(summary, indent=1) + "\n")
    if runs:
        plot_sweep(runs, args.out_dir / "sweep.png",
                   title=f"mixed x{args.length_scale:g} in / x{args.output_length_scale:g} out, "
                         f"{args.devices} CPU devices")
    print(format_table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
