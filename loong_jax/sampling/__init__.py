"""Sampling: parameters, the packed per-row batch, the jitted sampler, stop strings and detokenization."""
