"""The engine collector turns one `EngineSnapshot` into the scrape's gauges, counters and DoP histograms."""

import re
from pathlib import Path

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from loong_jax.server.metrics import EngineSnapshot, ServerMetrics


def _scrape(snapshot: EngineSnapshot) -> dict[str, float]:
    text = generate_latest(ServerMetrics(lambda: snapshot).registry).decode()
    return {sample.name + "".join(f'{{{k}="{v}"}}' for k, v in sample.labels.items()): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def test_queue_gauges_show_the_oldest_wait_and_the_late_requests():
    scraped = _scrape(EngineSnapshot(running=3, waiting=5, oldest_waiting_seconds=12.5, late=2))
    assert scraped["loong_jax_requests_running"] == 3 and scraped["loong_jax_requests_waiting"] == 5
    assert scraped["loong_jax_oldest_waiting_seconds"] == 12.5 and scraped["loong_jax_requests_late"] == 2


def test_kv_usage_and_dop_histograms_per_instance():
    scraped = _scrape(EngineSnapshot(kv_pages_total=(10, 10), kv_pages_used=(5, 0),
                                     prefill_dop_counts={1: 3, 4: 1}, decode_dop_counts={2: 7}))
    assert scraped['loong_jax_kv_usage_ratio{instance="0"}'] == 0.5
    assert scraped['loong_jax_kv_usage_ratio{instance="1"}'] == 0.0
    assert scraped['loong_jax_prefill_dop_bucket{le="1.0"}'] == 3
    assert scraped['loong_jax_prefill_dop_bucket{le="4.0"}'] == 4 and scraped["loong_jax_prefill_dop_sum"] == 7
    assert scraped['loong_jax_decode_dop_bucket{le="1.0"}'] == 0 and scraped["loong_jax_decode_dop_count"] == 7


def test_the_server_reads_the_engine_only_through_its_snapshot():
    """One `EngineSnapshot` (the engine's own), and no server module reaches into the engine's insides."""
    from loong_jax.engine import snapshot
    from loong_jax.server import metrics

    assert metrics.EngineSnapshot is snapshot.EngineSnapshot
    insides = re.compile(r"(?<!entrypoints)\.llm\b|\.executor\b|\.programs\b|\.allocator\b|\.dop_counts\b"
                         r"|(?<!prometheus_client)\.core\b|engine\.policy\b|engine\.state\b")
    server_dir = Path(metrics.__file__).parent
    offenders = [f"{path.name}:{number}: {line.strip()}" for path in sorted(server_dir.glob("*.py"))
                 for number, line in enumerate(path.read_text().splitlines(), 1) if insides.search(line)]
    assert not offenders
