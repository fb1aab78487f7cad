"""The elastic sequence parallelism policy: queue order and triage, batching, allocation, dispatch,
scaling."""
