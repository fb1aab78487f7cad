"""How a benchmark run is shown: a text summary per rate and a latency-against-rate plot.

Data flow:
  1. `format_summary(metrics)` prints one run's metrics in the layout of vLLM's serving benchmark
     (throughputs, then mean / median / p99 of TTFT, TPOT, ITL and E2EL, then LoongServe's normalised
     latencies and goodput).
  2. `plot_sweep({label: [metrics per rate]}, path)` draws one panel per latency (mean TTFT, mean TPOT,
     mean E2EL, normalised latency) against the request rate, one line per label (a policy, a server);
     runs at rate inf are placed at their achieved request throughput.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

PLOT_PANELS = (
    ("mean_ttft_ms", "mean TTFT (ms)"),
    ("p99_ttft_ms", "p99 TTFT (ms)"),
    ("mean_tpot_ms", "mean TPOT (ms)"),
    ("mean_e2el_ms", "mean E2E latency (ms)"),
    ("mean_normalized_latency_s", "normalised latency (s/token)"),
)


def _line(name: str, value, unit: str = "") -> str:
    shown = "n/a" if value is None else (f"{value:.2f}" if isinstance(value, float) else str(value))
    return f"{name + (' ' + unit if unit else ''):<44}{shown:>14}"


def format_summary(metrics: Mapping) -> str:
    rate = metrics.get("request_rate")
    lines = [f"{' serving benchmark result ':=^58}",
             _line("request rate (req/s)", "inf" if rate is None or math.isinf(rate) else float(rate)),
             _line("successful requests", metrics["completed"]), _line("failed requests", metrics["failed"]),
             _line("benchmark duration (s)", metrics["duration"]),
             _line("total input tokens", metrics["total_input_tokens"]),
             _line("total generated tokens", metrics["total_output_tokens"]),
             _line("request throughput (req/s)", metrics["request_throughput"]),
             _line("output token throughput (tok/s)", metrics["output_throughput"]),
             _line("total token throughput (tok/s)", metrics["total_token_throughput"])]
    if "request_goodput" in metrics:
        lines += [_line("request goodput (req/s)", metrics["request_goodput"]),
                  _line("SLO attainment", metrics["slo_attainment"])]
    for key, title in (("ttft", "time to first token"), ("tpot", "time per output token (excl. 1st)"),
                       ("itl", "inter-token latency"), ("e2el", "end-to-end latency")):
        lines.append(f"{' ' + title + ' ':-^58}")
        for stat in ("mean", "median", "p99"):
            lines.append(_line(f"{stat} {key.upper()} (ms)", metrics.get(f"{stat}_{key}_ms")))
    lines.append(f"{' normalised latencies (LoongServe) ':-^58}")
    lines += [_line("mean normalised latency (s/token)", metrics.get("mean_normalized_latency_s")),
              _line("mean normalised input latency (s/token)", metrics.get("mean_normalized_input_latency_s")),
              _line("mean output latency TPOT (s/token)", metrics.get("mean_normalized_output_latency_s"))]
    if "loongserve_slo_attainment" in metrics:
        lines.append(_line(f"SLO attainment ({metrics['loongserve_slo_scale']:g}x isolated)",
                           metrics["loongserve_slo_attainment"]))
    if metrics.get("server_programs_compiled_during_run") is not None:
        lines.append(_line("programs compiled during the run", metrics["server_programs_compiled_during_run"]))
    if metrics.get("errors"):
        lines.append("errors: " + "; ".join(metrics["errors"]))
    lines.append("=" * 58)
    return "\n".join(lines)


def _x_value(metrics: Mapping) -> float:
    rate = metrics.get("request_rate")
    return metrics["request_throughput"] if rate is None or math.isinf(rate) else float(rate)


def plot_sweep(runs: Mapping[str, Sequence[Mapping]], path: str | Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(PLOT_PANELS), figsize=(3.2 * len(PLOT_PANELS), 3.1), dpi=80)
    for label, points in runs.items():
        ordered = sorted(points, key=_x_value)
        rates = [_x_value(m) for m in ordered]
        for axis, (key, _) in zip(axes, PLOT_PANELS):
            pairs = [(x, m.get(key)) for x, m in zip(rates, ordered) if m.get(key) is not None]
            if pairs:
                axis.plot(*zip(*pairs), marker="o", markersize=3, label=label)
    for axis, (_, name) in zip(axes, PLOT_PANELS):
        axis.set_xlabel("request rate (req/s)", fontsize=8)
        axis.set_title(name, fontsize=9)
        axis.set_yscale("log")
        axis.tick_params(labelsize=7)
    axes[0].legend(fontsize=7)
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
