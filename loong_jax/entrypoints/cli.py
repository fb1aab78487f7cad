"""`loong-jax`: the command line.

Subcommands:
  generate    complete a prompt (argument or stdin) and stream the text to stdout (this module);
  serve       the gRPC server (`loong_jax.server.cli.serve_main`);
  client      one request to a running server, streamed to stdout (`loong_jax.server.client.client_main`);
  demo        serve on loopback, answer one request, drain (`loong_jax.server.demo.demo_main`);
  simulate    policies on a simulated cluster (`loong_jax.simulator.cli.simulate_main`);
  train-demo  retrain the shipped demo model (`loong_jax.models.train_demo.main`);
  profile     time the real programs on the current devices and fit the cost model (`loong_jax.entrypoints.profile_cli`).

Data flow of `generate`: flags -> `SamplingParams` (invalid values fail before the model loads) -> `LLM` (with
`--cpu-devices N` on N simulated CPU devices) -> its start-up summary (`LLM.describe`, `format_description`) to stderr ->
`llm.stream(prompt)` -> each delta's text is written to stdout as it comes; `--stats` prints timings and
engine counters to stderr at the end.

Importing this module, parsing flags and `--help` never import JAX (the policy names come from the
scheduler's registry, which does not import it): `loong-jax COMMAND --help` answers at once.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Sequence

from loong_jax.scheduler.policy import DEFAULT_POLICY, PolicySpec, policy_names

CPU_DEVICES_HELP = ("run on N simulated CPU devices (selects the CPU platform; set before JAX starts), "
                    "e.g. 8 to watch ESP choose degrees on a laptop")
# Subcommands implemented elsewhere: name -> (module, function taking argv).
DELEGATED = {
    "serve": ("loong_jax.server.cli", "serve_main", "run the gRPC server"),
    "client": ("loong_jax.server.client", "client_main", "stream one answer from a running server"),
    "demo": ("loong_jax.server.demo", "demo_main", "serve the demo model, answer one request, shut down"),
    "simulate": ("loong_jax.simulator.cli", "simulate_main", "compare scheduling policies on a simulated cluster"),
    "train-demo": ("loong_jax.models.train_demo", "main", "train the shipped demo model"),
    "bench": ("loong_jax.bench.cli", "bench_main", "benchmark a running server over gRPC (load generator)"),
    "eval": ("loong_jax.entrypoints.evaluate", "eval_main", "batch evaluation: JSONL of prompts -> JSONL of answers"),
    "profile": ("loong_jax.entrypoints.profile_cli", "profile_main", "measure the programs on these devices, fit a cost model"),
}


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    engine = parser.add_argument_group("model and engine")
    engine.add_argument("--model", default=None, help="checkpoint folder (Hugging Face files); default: demo model")
    engine.add_argument("--tp", type=int, default=1, help="devices per instance (tensor parallel)")
    engine.add_argument("--instances", type=int, default=None, help="instances (default: all devices / tp)")
    engine.add_argument("--policy", default=DEFAULT_POLICY, type=_policy_spec, metavar="POLICY[:KEY=VALUE...]",
                        help=f"scheduling policy: {', '.join(policy_names())} (default: %(default)s), with options, "
                             "e.g. esp:admission=on (refuse what cannot meet its deadline) or replicas:queue=deadline")
    engine.add_argument("--prefill-degree", type=int, default=None, help="prefill degree (policy fixed)")
    engine.add_argument("--decode-degree", type=int, default=None, help="decode degree (policy fixed)")
    engine.add_argument("--page-size", type=int, default=16, help="tokens per KV page")
    engine.add_argument("--kv-pages", type=int, default=None, help="KV pages per instance (default: from memory)")
    engine.add_argument("--dtype", default=None, choices=("float32", "bfloat16"), help="override the checkpoint dtype")
    engine.add_argument("--no-scan-layers", action="store_true",
                        help="one copy of the layer code per layer in every program (default: the layers run "
                             "under one scan over stacked weights, so compile time does not grow with depth)")
    engine.add_argument("--compilation-cache-dir", default=None, help="JAX persistent compilation cache folder")
    engine.add_argument("--no-warmup", action="store_true", help="compile programs on demand only")
    engine.add_argument("--no-async-scheduling", action="store_true",
                        help="wait for each step's tokens before planning the next (default: plan the next step "
                             "while the devices run this one)")
    engine.add_argument("--no-prefix-cache", action="store_true",
                        help="recompute every prompt (default: reuse the KV pages of cached prompt prefixes)")
    engine.add_argument("--prefix-cache-fraction", type=float, default=1.0, metavar="F",
                        help="share of each instance's KV pages the prefix cache may hold (default: %(default)s)")
    engine.add_argument("--cpu-devices", type=int, default=None, metavar="N", help=CPU_DEVICES_HELP)


def _policy_spec(text: str) -> PolicySpec:
    try:
        return PolicySpec.parse(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--max-tokens", type=int, default=128)
    sampling.add_argument("--min-tokens", type=int, default=0)
    sampling.add_argument("--temperature", type=float, default=0.0,
                          help="0 = greedy (the CLI's default; the Python API defaults to 1.0, like vLLM)")
    sampling.add_argument("--top-p", type=float, default=1.0)
    sampling.add_argument("--top-k", type=int, default=0)
    sampling.add_argument("--min-p", type=float, default=0.0)
    sampling.add_argument("--repetition-penalty", type=float, default=1.0)
    sampling.add_argument("--presence-penalty", type=float, default=0.0)
    sampling.add_argument("--frequency-penalty", type=float, default=0.0)
    sampling.add_argument("--seed", type=int, default=None)
    sampling.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    sampling.add_argument("--ignore-eos", action="store_true")


def generate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loong-jax generate",
                                     description="Complete a prompt and stream the text to stdout.")
    parser.add_argument("prompt", nargs="?", default=None, help="the prompt; '-' or nothing reads stdin")
    parser.add_argument("--chat", action="store_true", help="send the prompt as one user message (chat template)")
    parser.add_argument("--stats", action="store_true", help="print timings and engine counters to stderr")
    add_engine_arguments(parser)
    add_sampling_arguments(parser)
    return parser


def sampling_params_from_args(args: argparse.Namespace):
    from loong_jax.sampling.params import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens, min_tokens=args.min_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty, seed=args.seed,
        stop=args.stop or (), ignore_eos=args.ignore_eos)


def engine_kwargs_from_args(args: argparse.Namespace) -> dict:
    kwargs = dict(model=args.model, tp=args.tp, instances=args.instances, page_size=args.page_size,
                  kv_pages=args.kv_pages, policy=args.policy.name, policy_options=dict(args.policy.options) or None,
                  prefill_degree=args.prefill_degree,
                  decode_degree=args.decode_degree, dtype=args.dtype, warmup=not args.no_warmup,
                  scan_layers=False if args.no_scan_layers else None,
                  async_scheduling=not args.no_async_scheduling,
                  cpu_devices=args.cpu_devices, prefix_caching=not args.no_prefix_cache,
                  prefix_cache_fraction=args.prefix_cache_fraction)
    if args.compilation_cache_dir is not None:
        kwargs["compilation_cache_dir"] = args.compilation_cache_dir
    return kwargs


def generate_main(argv: Sequence[str] | None = None, stdout=None, stdin=None) -> int:
    stdout = stdout or sys.stdout
    parser = generate_parser()
    args = parser.parse_args(argv)
    try:
        params = sampling_params_from_args(args)
    except ValueError as error:
        parser.error(str(error))
    prompt = args.prompt
    if prompt is None or prompt == "-":
        prompt = (stdin or sys.stdin).read()
    if not prompt.strip():
        parser.error("the prompt is empty (give it as an argument or on stdin)")
    from loong_jax.entrypoints.llm import LLM, format_description  # imports JAX: only once the flags are good

    try:
        llm = LLM(**engine_kwargs_from_args(args), progress=sys.stderr.isatty())
    except (ValueError, FileNotFoundError) as error:
        print(f"loong-jax generate: error: {error}", file=sys.stderr)
        return 2
    print(f"loong-jax generate: {format_description(llm.describe())}", file=sys.stderr, flush=True)
    with llm:
        request = [{"role": "user", "content": prompt}] if args.chat else prompt
        final = None
        try:
            for delta in llm.stream(request, params):
                stdout.write(delta.outputs[0].text if delta.outputs else "")
                stdout.flush()
                final = delta
        except ValueError as error:
            print(f"\nloong-jax generate: error: {error}", file=sys.stderr)
            return 2
        stdout.write("\n")
        stdout.flush()
        if args.stats and final is not None:
            metrics = final.metrics
            report = {"finish_reason": final.outputs[0].finish_reason if final.outputs else None,
                      "queue_s": metrics.queue_time, "ttft_s": metrics.time_to_first_token,
                      "decode_s": metrics.decode_time, **llm.stats()}
            print(json.dumps(report, indent=2), file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATED:
        module, function, _ = DELEGATED[argv[0]]
        return getattr(importlib.import_module(module), function)(argv[1:]) or 0
    if argv and argv[0] == "generate":
        return generate_main(argv[1:])
    parser = argparse.ArgumentParser(prog="loong-jax", description="Long-context LLM serving on JAX with "
                                     "elastic sequence parallelism.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("generate", help="complete a prompt, streaming to stdout", add_help=False)
    for name, (_, _, description) in DELEGATED.items():
        commands.add_parser(name, help=description, add_help=False)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
