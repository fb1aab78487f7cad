"""Elastic sequence-parallel programs: topology, ring prefill, distributed decode, migration."""
