"""`benchmarks/simulate_h200.py --jobs`: policies searched in parallel processes give the same results as one
process, merged into one JSON document in the order the policies were asked for."""

import json

from tests.scripts import load_benchmark_script


def test_parallel_policies_merge_into_the_same_document(tmp_path):
    script = load_benchmark_script("simulate_h200")
    common = ["--workload", "zipf", "--instances", "4", "--num-requests", "40", "--plot-rates", "0",
              "--precision", "0.2", "--no-progress"]
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
