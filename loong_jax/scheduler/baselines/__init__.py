"""Baseline policies: static sequence parallelism, replicas, chunked prefill, prefill-decode
disaggregation and fixed degrees."""
