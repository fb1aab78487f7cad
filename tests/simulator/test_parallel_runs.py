"""`benchmarks/simulate_h200.py --jobs`: policies searched in parallel processes give the same results as one
process, merged into one JSON document in the order the policies were asked for."""

import json

from tests.scripts import load_benchmark_script


def test_parallel_policies_merge_into_the_same_document(tmp_path):
    script = load_benchmark_script("simulate_h200")
    common = ["--workload", "zipf", "--instances", "4", "--num-requests", "40", "--plot-rates", "0",
              "--precision", "0.2", "--steady-requests", "20", "--no-progress"]
    policies = ["esp", "replicas", "static-sp"]
    documents = {}
    for jobs in (1, 2):
        path = tmp_path / f"jobs{jobs}.json"
        script.run_workload("zipf", policies, common, path, jobs)
        documents[jobs] = json.loads(path.read_text())
    serial, parallel = documents[1], documents[2]
    assert list(parallel["policies"]) == policies
    assert parallel["summary"] == serial["summary"]
    for label in policies:
        assert ([p["slo_attainment"] for p in parallel["policies"][label]["points"]]
                == [p["slo_attainment"] for p in serial["policies"][label]["points"]])
        # Steady-state figures survive the merge through the JSON files.
        assert steady_figures(parallel, label) == steady_figures(serial, label) and steady_figures(serial, label)
        assert parallel["policies"][label]["max_sustainable_rate"] == serial["policies"][label]["max_sustainable_rate"]
    table = script.summary_markdown({"zipf": parallel})
    assert "| esp |" in table and "max sustainable rate" in table and "capacity bound" in table


def steady_figures(document: dict, label: str) -> list[dict]:
    """A policy's steady-state points without their wall time (which differs from run to run)."""
    return [{k: v for k, v in point.items() if k != "wall_seconds"} for point in document["policies"][label]["steady_points"]]
