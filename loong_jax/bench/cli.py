"""`loong-jax bench`: benchmark a running loong_jax server over gRPC, at one request rate or a sweep.

Data flow:
  1. Parse the flags (bad values fail before anything connects); connect a blocking client, wait until the
     server is ready, read the model's vocabulary and context from `GetModelInfo`.
  2. Build the requests once (`datasets`: a synthetic workload scaled by `--length-scale`, a ShareGPT JSON or
     a JSONL of prompts; text is tokenized by the server's Tokenize call, prompts are sent as token ids).
  3. With `--warmup-pass`, send the whole workload once, untimed, so the server has compiled every program
     shape it needs before anything is measured.
  4. For every rate (`--request-rate`, or each of `--request-rates`): draw the send times (`arrivals`,
     seeded; the same requests at every rate), send one untimed warm-up request, run the load
     (`runner.run_load`, progress bar), reduce the results (`metrics.compute_metrics`) and print them.
  5. `--json OUT` writes the metrics (one flat dict with vLLM's field names for one rate; for a sweep
     `{"config", "dataset", "results": [...]}`); `--plot OUT.png` draws latency against rate.

Example (server started with `loong-jax serve`):
  loong-jax bench --workload mixed --length-scale 0.01 --num-prompts 60 --request-rates 0.5,1,2 \
      --goodput ttft:2000 tpot:200 --json mixed.json --plot mixed.png
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from pathlib import Path
from typing import Sequence

from loong_jax.bench.arrivals import arrival_times, parse_rate
from loong_jax.bench.datasets import (Vocabulary, jsonl_requests, length_summary, sharegpt_requests,
                                      special_ids_of, synthetic_requests)
from loong_jax.bench.metrics import DEFAULT_PERCENTILES, compute_metrics, parse_goodput
from loong_jax.bench.report import format_summary, plot_sweep
from loong_jax.bench.runner import run_load
from loong_jax.simulator.metrics import DEFAULT_SLO_SCALE
from loong_jax.simulator.workloads import DOCUMENT_ARRIVALS, WORKLOADS


def _rate(text: str) -> float:
    try:
        return parse_rate(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _rates(text: str) -> list[float]:
    return [_rate(part) for part in text.replace(",", " ").split()]


def _percentiles(text: str) -> list[float]:
    values = [float(part) for part in text.replace(",", " ").split()]
    if not values or any(not 0 < v < 100 for v in values):
        raise argparse.ArgumentTypeError(f"percentiles must be numbers in (0, 100), got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loong-jax bench", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1")
    server.add_argument("--port", type=int, default=50051)
    server.add_argument("--api-key", default=None, help="sent as 'authorization: Bearer <key>'")
    server.add_argument("--tls-ca", default=None, help="CA certificate (PEM) of a TLS server")
    server.add_argument("--wait-for-server", type=float, default=60.0, help="seconds to wait until it is ready")
    server.add_argument("--timeout", type=float, default=None, help="per-request deadline in seconds")
    data = parser.add_argument_group("requests")
    data.add_argument("--workload", choices=WORKLOADS, default="sharegpt", help="synthetic workload")
    data.add_argument("--zipf-alpha", type=float, default=1.0)
    data.add_argument("--questions-per-document", type=int, default=4,
                      help="questions on each shared document (leval-docs, lveval-docs)")
    data.add_argument("--document-arrivals", choices=DOCUMENT_ARRIVALS, default="close",
                      help="a document's questions one after another (close) or scattered over the run (spread)")
    data.add_argument("--dataset-path", type=Path, default=None,
                      help="ShareGPT-format .json, or .jsonl with prompt / prompt_token_ids / messages + output_len")
    data.add_argument("--sharegpt-output-len", type=int, default=None, help="fixed output length for ShareGPT")
    data.add_argument("--num-prompts", type=int, default=100)
    data.add_argument("--length-scale", type=float, default=1.0,
                      help="multiply synthetic input and output lengths (e.g. 0.01 on a CPU)")
    data.add_argument("--output-length-scale", type=float, default=None,
                      help="multiply synthetic output lengths by this instead (default: --length-scale)")
    data.add_argument("--max-total-len", type=int, default=None,
                      help="clip prompt + output to this many tokens (default: what the server accepts)")
    data.add_argument("--respect-eos", action="store_true",
                      help="let requests stop at EOS (default: ignore_eos, so output lengths are exact)")
    data.add_argument("--temperature", type=float, default=0.0)
    load = parser.add_argument_group("load")
    load.add_argument("--request-rate", type=_rate, default=math.inf, help="requests/s, or inf (all at once)")
    load.add_argument("--request-rates", type=_rates, default=None, help="sweep: comma-separated rates")
    load.add_argument("--burstiness", type=float, default=1.0,
                      help="gamma shape of the arrival gaps: 1 = Poisson, < 1 burstier, > 1 more regular")
    load.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most")
    load.add_argument("--seed", type=int, default=0)
    load.add_argument("--warmup-requests", type=int, default=1, help="untimed requests before each run")
    load.add_argument("--warmup-pass", action="store_true",
                      help="send the whole workload once, untimed and all at once, before the first rate "
                           "(the server compiles every program shape the workload needs)")
    out = parser.add_argument_group("metrics and output")
    out.add_argument("--goodput", nargs="+", default=None, metavar="NAME:MS",
                     help="SLO bounds for goodput, e.g. ttft:500 tpot:50 (names: ttft, tpot, e2el)")
    out.add_argument("--percentiles", type=_percentiles, default=list(DEFAULT_PERCENTILES))
    out.add_argument("--slo-cost-model", type=Path, default=None,
                     help="cost-model JSON: adds LoongServe's SLO attainment (slo-scale x isolated latency)")
    out.add_argument("--slo-scale", type=float, default=DEFAULT_SLO_SCALE)
    out.add_argument("--slo-max-dop", type=int, default=1, help="instances the isolated latency may use")
    out.add_argument("--label", default="", help="name of this run in the JSON and the plot (e.g. the policy)")
    out.add_argument("--json", type=Path, default=None, help="write the metrics here")
    out.add_argument("--plot", type=Path, default=None, help="PNG of latency against rate")
    out.add_argument("--no-progress", action="store_true")
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.num_prompts < 1:
        parser.error("--num-prompts must be >= 1")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        parser.error("--max-concurrency must be >= 1")
    if not (args.burstiness > 0 and math.isfinite(args.burstiness)):
        parser.error("--burstiness must be a positive number")
    if not (args.length_scale > 0 and math.isfinite(args.length_scale)):
        parser.error("--length-scale must be a positive number")
    if args.output_length_scale is not None and not (args.output_length_scale > 0
                                                     and math.isfinite(args.output_length_scale)):
        parser.error("--output-length-scale must be a positive number")
    if args.warmup_requests < 0:
        parser.error("--warmup-requests must be >= 0")
    try:
        args.goodput_ms = parse_goodput(args.goodput)
    except ValueError as error:
        parser.error(str(error))
    if args.request_rates is not None and not args.request_rates:
        parser.error("--request-rates needs at least one rate")


def _wait_ready(client, seconds: float) -> None:
    from loong_jax.server.client import SERVICE_NAME

    deadline = time.monotonic() + seconds
    while True:
        try:
            if client.health(SERVICE_NAME, timeout=2.0) == "SERVING":
                return
        except Exception as error:  # noqa: BLE001 - any failure means "not yet"; the last one is reported
            last = (f"{error.code().name}: {error.details()}" if hasattr(error, "code") and callable(error.code)
                    else error)
        else:
            last = "not SERVING yet"
        if time.monotonic() > deadline:
            raise ConnectionError(f"server not ready after {seconds:g} s: {last}")
        time.sleep(0.5)


def build_requests(args: argparse.Namespace, client):
    info = client.model_info(timeout=30)
    context = info.max_prompt_tokens + 1 if info.max_prompt_tokens else info.context_length
    max_total = min(args.max_total_len or context, info.context_length or context)
    tokenize = lambda text_or_messages: client.tokenize(text_or_messages, timeout=30)  # noqa: E731
    if args.dataset_path is not None:
        if args.dataset_path.suffix.lower() in (".jsonl", ".ndjson"):
            return jsonl_requests(args.dataset_path, args.num_prompts, tokenize, max_total_len=max_total), max_total
        return sharegpt_requests(args.dataset_path, args.num_prompts, tokenize, seed=args.seed,
                                 max_total_len=max_total, fixed_output_len=args.sharegpt_output_len), max_total
    special = info.special_tokens
    vocabulary = Vocabulary(info.vocab_size, special_ids_of(
        [*special.eos_token_ids, special.bos_token_id if special.HasField("bos_token_id") else None,
         special.pad_token_id if special.HasField("pad_token_id") else None]))
    return synthetic_requests(args.workload, args.num_prompts, vocabulary, length_scale=args.length_scale,
                              output_scale=args.output_length_scale, max_total_len=max_total, seed=args.seed,
                              zipf_alpha=args.zipf_alpha, questions_per_document=args.questions_per_document,
                              document_arrivals=args.document_arrivals), max_total


async def _programs_ready(client) -> int | None:
    """Compiled programs the server holds (None if it does not say): the difference over a run counts the
    programs compiled while it ran, which show up as latency."""
    try:
        return int((await client.server_info(timeout=10)).programs_ready)
    except Exception:  # noqa: BLE001 - an older or foreign server: the count is optional
        return None


def _sampling(args) -> dict:
    return {"temperature": args.temperature, "ignore_eos": not args.respect_eos}


def _async_client(args):
    from loong_jax.server.client import AsyncLoongClient

    return AsyncLoongClient(f"{args.host}:{args.port}", api_key=args.api_key, root_ca=args.tls_ca)


async def _run_rate(args, requests, rate: float) -> tuple[list, float, dict]:
    sampling = _sampling(args)
    async with _async_client(args) as client:
        for request in requests[:args.warmup_requests]:
            await client.complete(list(request.prompt_token_ids), max_tokens=min(4, request.output_len),
                                  timeout=args.timeout, **sampling)
        send_times = arrival_times(len(requests), rate, args.burstiness, seed=args.seed)
        label = f"rate {'inf' if math.isinf(rate) else f'{rate:g}'}"
        before = await _programs_ready(client)
        results, duration = await run_load(client, requests, send_times, sampling=sampling,
                                           max_concurrency=args.max_concurrency, progress=not args.no_progress,
                                           timeout=args.timeout, description=label)
        after = await _programs_ready(client)
        server = {"server_programs_ready": after,
                  "server_programs_compiled_during_run": None if None in (before, after) else after - before}
        return results, duration, server


async def _warm_up_pass(args, requests) -> None:
    async with _async_client(args) as client:
        await run_load(client, requests, arrival_times(len(requests), math.inf, 1.0, seed=args.seed),
                       sampling=_sampling(args), max_concurrency=args.max_concurrency, progress=not args.no_progress,
                       timeout=args.timeout, description="warm-up pass")


def _json_value(value):
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return value


def bench_main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    from loong_jax.scheduler.cost.model import CostModel
    from loong_jax.server.client import LoongClient

    cost_model = CostModel.load_json(args.slo_cost_model) if args.slo_cost_model else None
    with LoongClient(f"{args.host}:{args.port}", api_key=args.api_key, root_ca=args.tls_ca) as client:
        try:
            _wait_ready(client, args.wait_for_server)
            requests, max_total = build_requests(args, client)
        except (ConnectionError, ValueError, FileNotFoundError) as error:
            print(f"loong-jax bench: error: {error}", file=sys.stderr)
            return 2
    dataset = {"source": str(args.dataset_path) if args.dataset_path else args.workload,
               "length_scale": args.length_scale,
               "output_length_scale": args.output_length_scale or args.length_scale, "max_total_len": max_total,
               **length_summary(requests)}
    config = {"label": args.label, "target": f"{args.host}:{args.port}", "burstiness": args.burstiness,
              "max_concurrency": args.max_concurrency, "num_prompts": len(requests), "seed": args.seed,
              "ignore_eos": not args.respect_eos}
    rates = args.request_rates or [args.request_rate]
    if args.warmup_pass:
        asyncio.run(_warm_up_pass(args, requests))
    results = []
    for rate in rates:
        run, duration, server = asyncio.run(_run_rate(args, requests, rate))
        metrics = compute_metrics(run, duration, request_rate=rate, goodput_ms=args.goodput_ms,
                                  percentiles=args.percentiles, cost_model=cost_model,
                                  max_dop=args.slo_max_dop, slo_scale=args.slo_scale)
        metrics = {"request_rate": rate, **config, **metrics, **server}
        print(format_summary(metrics), flush=True)
        results.append(metrics)
    if args.json is not None:
        if len(results) == 1:
            document = {**{k: _json_value(v) for k, v in results[0].items()}, "dataset": dataset}
        else:
            document = {"config": config, "dataset": dataset,
                        "results": [{k: _json_value(v) for k, v in r.items()} for r in results]}
        args.json.write_text(json.dumps(document, indent=1) + "\n")
    if args.plot is not None:
        plot_sweep({args.label or "loong_jax": results}, args.plot,
                   title=f"{dataset['source']} (length scale {args.length_scale:g})")
    return 0 if all(r["completed"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(bench_main())
