"""Reports of a simulation experiment: the max-throughput table and latency-vs-rate plots.

Data flow:
  1. `ExperimentResult.summary()` picks, per policy, its finite-run max rate under the SLO, its max
     sustainable rate (steady state, `steady.py`) and the capacity bound, and the ratios of ESP to the best
     baseline (ESP variants `esp:...` are neither) from the `ExperimentResult` the CLI builds.
  2. `format_table(results)` renders that as text (`format_steady_table`: the steady-state figures at the
     sustainable and at the finite-run max rate); `plot_experiment(results, path)` draws one panel per metric
     (normalised latency, input latency, output latency, SLO attainment) against the request rate, one line per
     policy (complete runs only: runs stopped early once the SLO was out of reach have biased latencies).
  3. `load_experiment(path)` rebuilds an `ExperimentResult` from the CLI's JSON (to re-plot or re-tabulate).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from loong_jax.simulator.metrics import RateMetrics
from loong_jax.simulator.run import RatePoint
from loong_jax.simulator.steady import SteadyPoint

ESP = "esp"


@dataclass
class PolicyResult:
    label: str
    max_rate: float | None  # requests/s under the SLO; None when no evaluated rate met it, inf when unbounded
    points: list[RatePoint] = field(default_factory=list)
    burst: RatePoint | None = None  # every request at t = 0
    sustainable_rate: float | None = None  # max sustainable rate (steady state); None: not measured or none
    steady_points: list[SteadyPoint] = field(default_factory=list)

    def steady_at(self, rate: float | None) -> SteadyPoint | None:
        """The complete steady-state run at `rate`, if one was made."""
        if rate is None:
            return None
        return next((p for p in self.steady_points if p.complete and p.request_rate == rate), None)

    @property
    def saturation_throughput(self) -> float | None:
        """Requests/s the cluster drains under this policy when all requests arrive at once."""
        return None if self.burst is None else self.burst.metrics.throughput

    @property
    def rejected_at_saturation(self) -> int:
        return 0 if self.burst is None else self.burst.metrics.rejected

    def to_dict(self) -> dict:
        ordered = sorted(self.points, key=lambda p: p.metrics.request_rate)
        return {
            "max_throughput": _json_safe(self.max_rate),
            "saturation_throughput": self.saturation_throughput,
            "points": [p.to_dict() for p in ordered],
            "burst": None if self.burst is None else self.burst.to_dict(),
            "max_sustainable_rate": self.sustainable_rate,
            "steady_points": [p.to_dict() for p in self.steady_points],
        }


@dataclass
class ExperimentResult:
    config: dict
    workload_stats: dict
    policies: dict[str, PolicyResult]

    def summary(self) -> dict:
        esp = self.policies.get(ESP)
        # ESP variants (esp:key=value, e.g. ablations) are neither ESP nor a baseline.
        baselines = {label: result for label, result in self.policies.items() if label.split(":")[0] != ESP}
        summary: dict = {
            "max_throughput": {label: r.max_rate for label, r in self.policies.items()},
            "saturation_throughput": {label: r.saturation_throughput for label, r in self.policies.items()},
            "capacity_bound": self.workload_stats.get("capacity_bound"),
            "max_sustainable_rate": {label: r.sustainable_rate for label, r in self.policies.items()},
        }
        if esp is not None and baselines and any(r.steady_points for r in self.policies.values()):
            best_sustainable = max(baselines, key=lambda label: baselines[label].sustainable_rate or 0.0)
            summary["best_baseline_sustainable"] = best_sustainable
            summary["esp_over_best_baseline_sustainable"] = _ratio(
                esp.sustainable_rate or 0.0, baselines[best_sustainable].sustainable_rate or 0.0)
        if esp is not None and baselines:
            best_label = max(  # ties (e.g. every policy unbounded) go to the higher saturation throughput
                baselines, key=lambda label: (baselines[label].max_rate or 0.0, baselines[label].saturation_throughput or 0.0)
            )
            esp_rate = esp.max_rate or 0.0
            summary["best_baseline"] = best_label
            summary["esp_over_best_baseline"] = _ratio(esp_rate, baselines[best_label].max_rate or 0.0)
            summary["esp_over_each_baseline"] = {label: _ratio(esp_rate, r.max_rate or 0.0) for label, r in baselines.items()}
            # Saturation compares finished requests/s, so only baselines that served as many requests as ESP
            # (rejected no more) are comparable: dropping the longest requests inflates the rate of the rest.
            comparable = [r for r in baselines.values() if r.rejected_at_saturation <= esp.rejected_at_saturation]
            best_saturation = max(((r.saturation_throughput or 0.0) for r in comparable), default=0.0)
            summary["esp_over_best_baseline_saturation"] = _ratio(esp.saturation_throughput or 0.0, best_saturation)
            summary["rejected_at_saturation"] = {label: r.rejected_at_saturation for label, r in self.policies.items()}
            # Unbounded (no rate made ESP miss) beats a baseline that some rate made miss; not another unbounded one.
            summary["esp_beats_every_baseline"] = all(esp_rate > (r.max_rate or 0.0) for r in baselines.values())
        return summary

    def to_dict(self) -> dict:
        return {
            "config": self.config,
            "workload_stats": self.workload_stats,
            "summary": _json_safe(self.summary()),
            "policies": {label: result.to_dict() for label, result in self.policies.items()},
        }


def _ratio(numerator: float, denominator: float) -> float | None:
    """ESP / baseline; None when undefined (both unbounded, or both zero)."""
    if math.isinf(numerator) and math.isinf(denominator) or numerator == denominator == 0:
        return None
    if denominator == 0:
        return math.inf
    return numerator / denominator


def _json_safe(value):
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return value


def format_table(result: ExperimentResult) -> str:
    summary = result.summary()
    ratios = summary.get("esp_over_each_baseline", {})
    lines = [f"{'policy':<28} {'max rate under SLO (req/s)':>27} {'ESP / policy':>13} {'saturation (req/s)':>19}"]
    for label, rate in summary["max_throughput"].items():
        ratio = _ratio_text(ratios.get(label)) if label in ratios else ""
        saturation = summary["saturation_throughput"].get(label)
        shown = "" if saturation is None else f"{saturation:.3f}"
        rejected = summary.get("rejected_at_saturation", {}).get(label)
        if rejected:
            shown += f" ({rejected} rejected)"
        lines.append(f"{label:<28} {_rate_text(rate):>27} {ratio:>13} {shown:>19}")
    if "best_baseline" in summary:
        best = summary["esp_over_best_baseline"]
        lines.append(f"ESP / best baseline ({summary['best_baseline']}): {_ratio_text(best)}; at saturation: "
                     f"{_ratio_text(summary['esp_over_best_baseline_saturation'])}")
    if any(rate is not None and math.isinf(rate) for rate in summary["max_throughput"].values()):
        lines.append("unbounded: the run's N requests all meet the SLO however fast they arrive (raise --num-requests)")
    if any(r.steady_points for r in result.policies.values()):
        lines.append("")
        lines.append(format_steady_table(result))
    return "\n".join(lines)


def _steady_cells(point: SteadyPoint | None) -> str:
    """middle-window attainment, backlog growth (req/s), rejected + unserved share of one steady-state run."""
    if point is None:
        return f"{'—':>34}"
    growth = f"{point.backlog_growth_per_s:+.3f}{'↑' if point.backlog_growing else ''}"
    lost = f"{100 * point.rejected_share:.1f}+{100 * point.unserved_share:.1f}%"
    return f"{100 * point.middle_attainment:>7.1f}% {growth:>13} {lost:>11}"


def format_steady_table(result: ExperimentResult) -> str:
    """Finite-run max rate next to the figures that cannot be flattered (see `steady.py`)."""
    summary = result.summary()
    bound = summary.get("capacity_bound")
    header = (f"{'policy':<28} {'finite max':>10} {'sustainable':>11} {'bound':>7} | at sustainable: "
              f"{'middle':>8} {'backlog/s':>13} {'rej+unserved':>11} | at finite max: "
              f"{'middle':>8} {'backlog/s':>13} {'rej+unserved':>11}")
    lines = [header]
    for label, policy in result.policies.items():
        bound_text = "" if bound is None else f"{bound:.3f}"
        lines.append(f"{label:<28} {_rate_text(policy.max_rate):>10} {_rate_text(policy.sustainable_rate):>11} "
                     f"{bound_text:>7} | {'':15}{_steady_cells(policy.steady_at(policy.sustainable_rate))} | "
                     f"{'':14}{_steady_cells(policy.steady_at(policy.max_rate))}")
    if "best_baseline_sustainable" in summary:
        lines.append(f"ESP / best baseline, sustainable ({summary['best_baseline_sustainable']}): "
                     f"{_ratio_text(summary['esp_over_best_baseline_sustainable'])}")
    steady_requests = result.config.get("steady_requests")
    lines.append(f"sustainable: highest rate with >= {result.config.get('attainment_target', 0.9):.0%} SLO attainment over "
                 f"the middle half of {steady_requests} arrivals and no growing backlog of outstanding work (↑; "
                 "backlog/s in request-equivalents), at most the bound (equal to it: too close to tell at this run "
                 "length); bound: the cost model's capacity bound (req/s) serving every request; rej+unserved: "
                 "shares of the requests arrived by the window's end rejected, and left unfinished when the run stops")
    return "\n".join(lines)


def _rate_text(rate: float | None) -> str:
    if rate is None:
        return "none"
    return "unbounded" if math.isinf(rate) else f"{rate:.3f}"


def _ratio_text(ratio: float | None) -> str:
    if ratio is None:
        return "undefined"
    return "inf" if math.isinf(ratio) else f"{ratio:.2f}x"


PANELS = (
    ("mean_normalized_latency", "normalised latency (s/token)", True),
    ("mean_normalized_input_latency", "input latency (s/token)", True),
    ("mean_output_latency", "output latency TPOT (s)", True),
    ("slo_attainment", "SLO attainment", False),
)


def plot_experiment(result: ExperimentResult, path: str | Path, title: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    figure, axes = plt.subplots(1, len(PANELS), figsize=(13, 3.1), dpi=70)
    plotted = False
    for label, policy in result.policies.items():
        complete = sorted((p for p in policy.points if p.complete and math.isfinite(p.metrics.request_rate)),
                          key=lambda p: p.metrics.request_rate)
        rates = [p.metrics.request_rate for p in complete]
        for axis, (metric, _, _) in zip(axes, PANELS):
            values = [getattr(p.metrics, metric) for p in complete]
            axis.plot(rates, values, marker="o", markersize=3, label=label, linewidth=2.0 if label == ESP else 1.0)
            plotted = plotted or bool(rates)
    target = result.config.get("attainment_target")
    for axis, (_, name, log_scale) in zip(axes, PANELS):
        axis.set_xlabel("request rate (req/s)")
        axis.set_title(name, fontsize=9)
        if plotted:  # log axes need data; an empty figure still says what it would have shown
            axis.set_xscale("log")
            # Labels at 1, 2, 5 x 10^k as plain numbers: default minor labels of a short log range overlap.
            axis.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            axis.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
            axis.xaxis.set_minor_formatter(NullFormatter())
            if log_scale:
                axis.set_yscale("log")
        axis.tick_params(labelsize=7)
    if target is not None:
        axes[-1].axhline(target, color="grey", linestyle="--", linewidth=0.8)
    axes[-1].legend(fontsize=7)
    figure.suptitle(title or result.config.get("workload", ""), fontsize=10)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def _point_from_dict(row: dict) -> RatePoint:
    def number(value):
        if value is None:
            return math.nan
        return math.inf if value == "burst" else value

    metrics = RateMetrics(**{name: number(row[name]) for name in RateMetrics.__dataclass_fields__})
    return RatePoint(
        policy=row["policy"], metrics=metrics, complete=row["complete"], counters=row.get("counters", {}),
        prefill_dops={int(k): v for k, v in row.get("prefill_dops", {}).items()},
        decode_dops={int(k): v for k, v in row.get("decode_dops", {}).items()},
        units=row.get("units", {}), utilization=number(row.get("utilization")),
        scheduler_ms_median=number(row.get("scheduler_ms_median")),
        virtual_seconds=row.get("virtual_seconds", 0.0), wall_seconds=row.get("wall_seconds", 0.0),
    )


def load_experiment(path: str | Path) -> ExperimentResult:
    import json

    document = json.loads(Path(path).read_text())
    policies = {}
    for label, entry in document["policies"].items():
        rate = entry["max_throughput"]
        policies[label] = PolicyResult(
            label,
            math.inf if rate == "inf" else rate,
            [_point_from_dict(row) for row in entry["points"]],
            None if entry.get("burst") is None else _point_from_dict(entry["burst"]),
            entry.get("max_sustainable_rate"),
            [SteadyPoint.from_dict(row) for row in entry.get("steady_points", [])],
        )
    return ExperimentResult(document["config"], document["workload_stats"], policies)
