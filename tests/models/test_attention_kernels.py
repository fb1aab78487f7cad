"""The project's Pallas attention kernels, run in interpret mode on CPU, against the float64 references:
the flash prefill kernel on packed batches and striped ring steps, the paged decode kernel on ragged page
entries; plus their CUDA lowering (the Triton custom call) at Llama-2-7B shapes, and the dispatch override."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from loong_jax.models.kernels import dispatch
from loong_jax.models.kernels.paged_decode_attention import paged_decode_partials, row_entry_ranges
from loong_jax.models.kernels.prefill_attention import prefill_partial_attention
from loong_jax.sharding.stripe_layout import stream_positions, stream_segments, striped_layout
from tests.models.attention_reference import reference_attention

TILE = 16  # small tiles: many tile pairs, prompt boundaries on and off tile edges
ROWS = 112
TRITON_CALL = "__gpu$xla.gpu.triton"
# (q_heads, kv_heads, head_dim, dtype): GQA in float32, MQA in bfloat16 (bf16 tiles, float32 accumulation).
HEAD_CASES = [(4, 2, 64, jnp.float32), (4, 1, 128, jnp.bfloat16)]


def tolerance(dtype):
    return 1e-5 if dtype == jnp.float32 else 2e-2  # bf16: weights enter the value matmul in bf16


@functools.lru_cache(maxsize=None)
def interpreted_prefill(head_dim):
    return jax.jit(functools.partial(prefill_partial_attention, scale=head_dim ** -0.5, interpret=True,
                                     q_tile=TILE, kv_tile=TILE))


def random_heads(rng, rows, heads, head_dim, dtype, garbage_rows=None):
    """[rows, heads, head_dim] in `dtype` (as float32 numpy, exactly representable); NaN on garbage rows."""
    x = np.array(jnp.asarray(rng.standard_normal((rows, heads, head_dim)), dtype).astype(jnp.float32))
    if garbage_rows is not None:
        x[garbage_rows] = np.nan
    return x


def check_prefill(rng, heads, q_pos, q_seg, kv_pos, kv_seg):
    q_heads, kv_heads, head_dim, dtype = heads
    q = random_heads(rng, len(q_pos), q_heads, head_dim, dtype)
    q[q_seg < 0] = 0.0
    k = random_heads(rng, len(kv_pos), kv_heads, head_dim, dtype, garbage_rows=kv_seg < 0)
    v = random_heads(rng, len(kv_pos), kv_heads, head_dim, dtype, garbage_rows=kv_seg < 0)
    out, lse = interpreted_prefill(head_dim)(jnp.asarray(q, dtype), jnp.asarray(k, dtype), jnp.asarray(v, dtype),
                                             q_pos, q_seg, kv_pos, kv_seg)
    out, lse = np.asarray(out), np.asarray(lse)
    assert out.dtype == lse.dtype == np.float32
    ref_out, ref_lse = reference_attention(q, np.nan_to_num(k), np.nan_to_num(v), q_pos, q_seg, kv_pos, kv_seg)
    assert not np.isnan(out).any() and not np.isnan(lse).any()
    unseen = np.isneginf(ref_lse)
    np.testing.assert_array_equal(np.isneginf(lse), unseen)
    assert (out[unseen.all(axis=1)] == 0).all()
    np.testing.assert_allclose(out, ref_out, rtol=0, atol=tolerance(dtype) * np.abs(ref_out).max())
    np.testing.assert_allclose(lse[~unseen], ref_lse[~unseen], rtol=1e-5, atol=1e-4)
    return unseen


@pytest.mark.parametrize("heads", HEAD_CASES, ids=["gqa-d64-f32", "mqa-d128-bf16"])
def test_prefill_kernel_packed_batch(heads):
    """Boundaries at 16, 48, 80 (tile edges) and 21, 81, 92 (inside tiles); padding rows after them; the keys
    lack prompt 4, so its query sees nothing (lse -inf, out 0)."""
    lengths = [16, 5, 27, 32, 1, 11]
    total = sum(lengths)
    positions, segments = np.zeros(ROWS, np.int32), np.full(ROWS, -1, np.int32)
    positions[:total], segments[:total] = stream_positions(lengths), stream_segments(lengths)
    kv_segments = np.where(segments == 4, -1, segments).astype(np.int32)
    unseen = check_prefill(np.random.default_rng(0), heads, positions, segments, positions, kv_segments)
    assert unseen[segments == 4].all() and unseen[segments < 0].all() and not unseen[segments == 0].any()


@pytest.mark.parametrize("member,source", [(1, 0), (0, 1), (1, 1)], ids=["source-before", "source-after", "own"])
def test_prefill_kernel_striped_ring_steps(member, source):
    """A ring step: member's queries over the block of `source` in the striped layout of 2 members."""
    layout = striped_layout([37, 16, 50, 3, 60], members=2, rows_per_member=ROWS)
    rows = lambda m: slice(m * ROWS, (m + 1) * ROWS)  # noqa: E731
    positions, segments = layout.positions, layout.segment_ids
    check_prefill(np.random.default_rng(member * 2 + source), HEAD_CASES[0], positions[rows(member)],
                  segments[rows(member)], positions[rows(source)], segments[rows(source)])


# ---------------------------------------------------------------- paged decode
def decode_case(rng, q_heads, kv_heads, head_dim, page_size, held_per_row, entries, pages=48):
    """A member's pool (NaN where nothing was written), its sorted, padded page entries and the rows' tokens."""
    pool = np.full((1, 2, 2, pages, page_size, kv_heads, head_dim), np.nan, np.float32)
    free_pages = list(rng.permutation(pages))
    entry_rows, entry_pages, entry_tokens, held_slots = [], [], [], []
    for row, held in enumerate(held_per_row):
        slots = []
        for start in range(0, held, page_size):
            page = free_pages.pop()
            tokens = min(page_size, held - start)
            pool[0, :, :, page, :tokens] = rng.standard_normal((2, 2, tokens, kv_heads, head_dim))
            entry_rows.append(row), entry_pages.append(page), entry_tokens.append(tokens)
            slots += [(page, offset) for offset in range(tokens)]
        held_slots.append(slots)
    padding = entries - len(entry_rows)
    rows = len(held_per_row)
    entry_rows += [rows - 1] * padding
    entry_pages += [0] * padding
    entry_tokens += [0] * padding
    q = rng.standard_normal((rows, q_heads, head_dim)).astype(np.float32)
    as_int = lambda x: np.asarray(x, np.int32)  # noqa: E731
    return q, pool, as_int(entry_rows), as_int(entry_pages), as_int(entry_tokens), held_slots


def decode_reference(q, pool, layer, held_slots):
    out, lse = np.zeros(q.shape), np.full(q.shape[:2], -np.inf)
    for row, slots in enumerate(held_slots):
        if not slots:
            continue
        pages, offsets = np.array(slots).T
        k, v = pool[0, layer, 0, pages, offsets], pool[0, layer, 1, pages, offsets]  # [held, kvh, hd]
        zeros = np.zeros(1, np.int32)
        out[row], lse[row] = (x[0] for x in reference_attention(
            q[row:row + 1], k, v, zeros, zeros, np.zeros(len(slots), np.int32), np.zeros(len(slots), np.int32)))
    return out, lse


@pytest.mark.parametrize("q_heads,kv_heads,head_dim,page_size,splits", [
    (4, 2, 64, 4, None), (4, 1, 128, 16, 3), (8, 2, 64, 8, 2)], ids=["gqa-d64-p4", "mqa-d128-p16", "gqa-d64-p8"])
def test_paged_decode_kernel(q_heads, kv_heads, head_dim, page_size, splits):
    """Rows holding nothing, part of a page, whole pages and many pages; padding entries and a NaN-filled
    pool outside the held tokens; split-K merged in a fixed order (two runs are bit-identical)."""
    rng = np.random.default_rng(page_size)
    held = [10, 0, 2, 37, page_size, 0, 23]
    q, pool, rows, pages, tokens, slots = decode_case(rng, q_heads, kv_heads, head_dim, page_size, held, 40)
    program = jax.jit(lambda *args: paged_decode_partials(*args, head_dim ** -0.5, interpret=True, splits=splits),
                      static_argnums=2)
    out, lse = program(q, pool, 1, rows, pages, tokens)
    ref_out, ref_lse = decode_reference(q, pool, 1, slots)
    out, lse = np.asarray(out), np.asarray(lse)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_lse))
    assert not np.isnan(out).any() and (out[[1, 5]] == 0).all()
    np.testing.assert_allclose(out, ref_out, rtol=0, atol=1e-5 * np.abs(ref_out).max())
    held_rows = ~np.isneginf(ref_lse)
    np.testing.assert_allclose(lse[held_rows], ref_lse[held_rows], rtol=1e-5, atol=1e-5)
    again_out, again_lse = program(q, pool, 1, rows, pages, tokens)
    np.testing.assert_array_equal(np.asarray(again_out), out)
    np.testing.assert_array_equal(np.asarray(again_lse), lse)


def test_row_entry_ranges_skip_padding_entries():
    """Padding entries (0 tokens, named after the last row) are not part of any row's range."""
    first, count = row_entry_ranges(jnp.array([0, 0, 2, 3, 3, 3, 3]), jnp.array([4, 1, 3, 2, 0, 0, 0]), 4)
    np.testing.assert_array_equal(first[count > 0], [0, 2, 3])
    np.testing.assert_array_equal(count, [2, 0, 1, 1])


# ---------------------------------------------------------------- CUDA lowering at Llama-2-7B shapes
def lowered_for_cuda(function, *args) -> str:
    return jax.jit(function).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def test_prefill_kernel_lowers_for_cuda_at_7b_shapes():
    tokens, heads, head_dim = 4096, 32, 128
    spec = jax.ShapeDtypeStruct
    qkv = [spec((tokens, heads, head_dim), jnp.bfloat16)] * 3
    rows = [spec((tokens,), jnp.int32)] * 4
    text = lowered_for_cuda(functools.partial(prefill_partial_attention, scale=head_dim ** -0.5), *qkv, *rows)
    assert TRITON_CALL in text


def test_paged_decode_kernel_lowers_for_cuda_at_7b_shapes():
    batch, context, heads, head_dim, page_size = 32, 4096, 32, 128, 16
    pages = batch * context // page_size
    spec = jax.ShapeDtypeStruct
    q = spec((batch, heads, head_dim), jnp.bfloat16)
    pool = spec((1, 1, 2, pages, page_size, heads, head_dim), jnp.bfloat16)
    entries = [spec((pages,), jnp.int32)] * 3
    def decode(q, pool, entry_rows, entry_pages, entry_tokens):
        return paged_decode_partials(q, pool, 0, entry_rows, entry_pages, entry_tokens, head_dim ** -0.5)

    text = lowered_for_cuda(decode, q, pool, *entries)
    assert TRITON_CALL in text


# ---------------------------------------------------------------- dispatch
def test_attention_impl_from_env():
    assert dispatch.attention_impl_from_env({}) == "auto"
    assert dispatch.attention_impl_from_env({"LOONG_JAX_ATTENTION": "Interpret"}) == "interpret"
    with pytest.raises(ValueError, match="LOONG_JAX_ATTENTION"):
        dispatch.attention_impl_from_env({"LOONG_JAX_ATTENTION": "fast"})


def test_by_platform_picks_the_kernel_on_cuda_only():
    """auto: CPU lowering keeps the reference branch only, CUDA lowering the kernel only."""
    reference = lambda x: x + 1.0  # noqa: E731
    kernel = lambda x, interpret: jnp.sin(x) if interpret else jnp.cos(x)  # noqa: E731
    program = jax.jit(functools.partial(dispatch.by_platform, "auto", reference, kernel))
    x = jnp.zeros(3)
    cpu = program.trace(x).lower(lowering_platforms=("cpu",)).as_text()
    cuda = program.trace(x).lower(lowering_platforms=("cuda",)).as_text()
    assert "add" in cpu and "cosine" not in cpu
    assert "cosine" in cuda and "add" not in cuda
    assert float(dispatch.by_platform("interpret", reference, kernel, jnp.float32(0.0))) == 0.0  # sin(0)
    assert float(dispatch.by_platform("reference", reference, kernel, jnp.float32(0.0))) == 1.0


def test_an_engine_settles_auto_for_its_platform():
    assert dispatch.for_platform("auto", "cpu") == "reference"
    assert dispatch.for_platform("auto", "gpu") == "kernel"
    assert dispatch.for_platform("interpret", "gpu") == "interpret"
    assert float(dispatch.by_platform("kernel", jnp.cos, lambda x, interpret: jnp.sin(x), jnp.float32(0.0))) == 0.0
