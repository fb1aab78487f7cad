"""Prefix-cache numbers of the engine snapshot reach the Prometheus scrape."""

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from loong_jax.server.metrics import EngineSnapshot, ServerMetrics


def test_prefix_cache_counters_gauges_and_hit_rate_are_scraped():
    snapshot = EngineSnapshot(kv_pages_total=(10, 10), kv_pages_used=(2, 0), kv_pages_cached=(6, 1),
                              prefix_cache_queries=8, prefix_cache_hits=7, prefix_cache_query_tokens=1000,
                              prefix_cache_hit_tokens=750)
    text = generate_latest(ServerMetrics(lambda: snapshot).registry).decode()
    scraped = {sample.name + "".join(f'{{{k}="{v}"}}' for k, v in sample.labels.items()): sample.value
               for family in text_string_to_metric_families(text) for sample in family.samples}
    assert scraped['loong_jax_kv_pages_cached{instance="0"}'] == 6
    assert scraped['loong_jax_kv_pages_cached{instance="1"}'] == 1
    assert scraped["loong_jax_prefix_cache_queries_total"] == 8
    assert scraped["loong_jax_prefix_cache_hits_total"] == 7
    assert scraped["loong_jax_prefix_cache_hit_tokens_total"] == 750
    assert scraped["loong_jax_prefix_cache_query_tokens_total"] == 1000
    assert scraped["loong_jax_prefix_cache_hit_rate"] == 0.75
    assert EngineSnapshot().prefix_cache_hit_rate == 0.0
