"""Hand-made cluster states for scheduler tests: a synthetic cost model and view builders."""

from __future__ import annotations

from loong_jax.scheduler.cost.model import CostModel, DecodeCoefficients, PrefillCoefficients
from loong_jax.scheduler.view import DECODING, WAITING, InstanceView, RequestView, SchedulerView

PAGE = 16


def synthetic_cost(page_size: int = PAGE, pages_per_instance: int = 1000, max_dop: int = 8) -> CostModel:
    """A cost model with round numbers: prefill on d instances scales the per-token work by 1/d with 90%
    efficiency per doubling; decode reads KV at 1e-7 s/token over d instances."""
    prefill, decode = {}, {}
    d = 1
    while d <= max_dop:
        efficiency = 0.9 ** (d.bit_length() - 1)
        prefill[d] = PrefillCoefficients(0.002 + 0.0005 * d, 2e-5 / (d * efficiency), 4e-10 / (d * efficiency))
        decode[d] = DecodeCoefficients(0.005 + 0.0005 * d, 1e-5, 1e-7 / (d * efficiency))
        d *= 2
    return CostModel(tp=1, prefill=prefill, decode=decode, migration_seconds_per_byte=1e-11,
                     migration_latency_s=1e-4, kv_bytes_per_token=2 ** 19, pages_per_instance=pages_per_instance,
                     page_size=page_size)


def instances(free_pages, total: int = 1000, busy=(), busy_for: float = 10.0):
    """Instance views; busy ones are expected to stay busy `busy_for` more seconds."""
    return tuple(InstanceView(i, total, free, i in busy, busy_for if i in busy else 0.0)
                 for i, free in enumerate(free_pages))


def waiting(*lengths, max_new_tokens: int = 64, start_seq: int = 0):
    return tuple(RequestView(f"w{k}", start_seq + k, float(start_seq + k), length, max_new_tokens=max_new_tokens)
                 for k, length in enumerate(lengths))


def decoding(request_id, seq: int, kv: dict, master: int, prompt_len: int | None = None, generated: int = 1,
             max_new_tokens: int = 64, in_flight: bool = False) -> RequestView:
    """A decoding request whose KV is `kv` (instance -> tokens); prompt_len defaults to the KV it implies."""
    tokens = sum(kv.values())
    prompt = prompt_len if prompt_len is not None else tokens - generated + 1
    assert prompt + generated - 1 == tokens, "decode KV holds prompt + generated - 1 tokens"
    return RequestView(request_id, seq, float(seq), prompt, num_generated=generated, max_new_tokens=max_new_tokens,
                       kv=dict(kv), master=master, in_flight=in_flight, status=DECODING)


def view(instance_views, waiting_requests=(), decoding_requests=(), cost=None, **options) -> SchedulerView:
    cost = cost or synthetic_cost(pages_per_instance=instance_views[0].pages_total)
    return SchedulerView(instances=tuple(instance_views), waiting=tuple(waiting_requests),
                         decoding=tuple(decoding_requests), page_size=PAGE, cost_model=cost, **options)


__all__ = ["PAGE", "WAITING", "decoding", "instances", "synthetic_cost", "view", "waiting"]
