"""The project's GPU attention kernels (Pallas, Triton backend) and the choice between them and the
XLA reference code.

  - `prefill_attention`: flash attention over packed streams with per-row positions and segment ids,
    visiting only the key tiles each query tile can meet; contiguous keys or keys gathered from a pool.
  - `paged_decode_attention`: one query per request over its pages of a member's pool, split-K.
  - `dispatch`: `LOONG_JAX_ATTENTION` and `by_platform` (kernels on CUDA, reference code on CPU,
    or the kernels in interpret mode anywhere).
"""
