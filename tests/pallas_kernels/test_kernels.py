"""The Mosaic GPU kernels in interpret mode on CPU against their plain-jnp references.

Pools are random, block tables are random permutations (fragmented), lengths run from 1 to
the pool's per-sequence capacity and differ within a batch, and every slot no sequence owns,
null block 0 included, holds NaN, so any stray read shows up in the output.

Tolerance (bf16 inputs; kernel: bf16 operands, f32 accumulation, P rounded to bf16 before
P @ V, bf16 output; reference: f32 throughout): |out - ref| <= 3e-2 + 3e-2 * |ref| elementwise
and ||out - ref|| / ||ref|| < 1e-2. Observed max |err| on CPU and on an H100: 0.004 to 0.016.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import (
    KernelConfig,
    decode_paged_attention,
    decode_paged_attention_reference,
    kv_cache_shape,
    ragged_paged_attention,
    ragged_paged_attention_reference,
    write_kv,
    write_kv_reference,
)

ATOL = RTOL = 3e-2
REL_NORM = 1e-2


def make_pool(rng, lens, num_kv_heads, head_dim, block_size, layout, spare_blocks=3):
    """NaN-filled pool; each sequence's first lens[b] slots get random values."""
    max_blocks = max(-(-n // block_size) for n in lens) + 1
    used = sum(-(-n // block_size) for n in lens)
    num_blocks = used + spare_blocks + 1
    perm = rng.permutation(np.arange(1, num_blocks))
    shape = kv_cache_shape(layout, num_blocks, block_size, num_kv_heads, head_dim)
    k = np.full(shape, np.nan, np.float32)
    v = np.full(shape, np.nan, np.float32)
    tables, c = np.zeros((len(lens), max_blocks), np.int32), 0
    for b, n in enumerate(lens):
        pages = -(-n // block_size)
        tables[b, :pages] = perm[c : c + pages]
        c += pages
        for j in range(pages):
            rows = min(block_size, n - j * block_size)
            for arr in (k, v):
                vals = rng.standard_normal((rows, num_kv_heads, head_dim))
                if layout == "NHD":
                    arr[tables[b, j], :rows] = vals
                else:
                    arr[tables[b, j], :, :rows] = vals.transpose(1, 0, 2)
    as_bf16 = lambda x: jnp.asarray(x, jnp.bfloat16)  # noqa: E731
    return as_bf16(k), as_bf16(v), jnp.asarray(tables), jnp.asarray(np.array(lens, np.int32))


def assert_close(out, ref, rows=None):
    out = np.asarray(out.astype(jnp.float32))[:rows]
    ref = np.asarray(ref.astype(jnp.float32))[:rows]
    assert not np.isnan(out).any(), "NaN in kernel output"
    np.testing.assert_allclose(out, ref, atol=ATOL, rtol=RTOL)
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < REL_NORM


# (G, head_dim, block_size, layout, block_kv, num_splits): every listed value appears.
DECODE_CASES = [
    (1, 64, 16, "NHD", 64, 1),
    (4, 128, 32, "HND", 64, 3),
    (8, 64, 32, "NHD", 128, 1),
    (4, 64, 16, "NHD", 128, 2),
    (8, 128, 16, "HND", 64, 1),
    (1, 128, 32, "NHD", 64, 4),
]


@pytest.mark.parametrize("group,head_dim,block_size,layout,block_kv,splits", DECODE_CASES)
def test_decode_matches_reference(group, head_dim, block_size, layout, block_kv, splits):
    rng = np.random.default_rng(group * 1000 + head_dim + block_size + splits)
    cap = 5 * block_size  # every sequence fits in 5 blocks; one uses all of them
    lens = [1, 37, cap, 0, int(rng.integers(2, cap)), block_size]
    kh = 2
    k, v, tables, seq_lens = make_pool(rng, lens, kh, head_dim, block_size, layout)
    q = jnp.asarray(rng.standard_normal((len(lens), kh * group, head_dim)), jnp.bfloat16)
    cfg = KernelConfig(block_kv=block_kv, num_stages=2, num_splits=splits)
    scale = head_dim**-0.5
    out = decode_paged_attention(
        q, k, v, tables, seq_lens, scale=scale, layout=layout, config=cfg, interpret=True
    )
    ref = decode_paged_attention_reference(q, k, v, tables, seq_lens, scale=scale, layout=layout)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_close(out, ref)
    assert not np.asarray(out[3]).any(), "padding row (seq_len 0) must be zeros"


# (G, head_dim, block_size, layout, block_kv); G=1 gives 64-token tiles, so a 130-token chunk
# spans three tiles of one request.
RAGGED_CASES = [
    (1, 64, 16, "NHD", 64),
    (4, 128, 32, "HND", 128),
    (8, 64, 16, "NHD", 64),
    (4, 64, 32, "NHD", 128),
    (8, 128, 32, "HND", 64),
]


@pytest.mark.parametrize("group,head_dim,block_size,layout,block_kv", RAGGED_CASES)
def test_ragged_matches_reference(group, head_dim, block_size, layout, block_kv):
    rng = np.random.default_rng(group * 100 + head_dim + block_size)
    lens = [1, 70, 150, 0, 33, 5 * 32]
    q_lens = [1, 70, 130, 0, 5, 17]  # whole prompt, chunk with history, decode-like rows
    kh = 2
    k, v, tables, seq_lens = make_pool(rng, lens, kh, head_dim, block_size, layout)
    qsl = jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32))
    num_tokens = int(qsl[-1]) + 3  # three padding tokens
    q = jnp.asarray(rng.standard_normal((num_tokens, kh * group, head_dim)), jnp.bfloat16)
    cfg = KernelConfig(block_kv=block_kv, num_stages=2)
    scale = head_dim**-0.5
    out = ragged_paged_attention(
        q, k, v, tables, seq_lens, qsl, scale=scale, layout=layout, config=cfg, interpret=True
    )
    ref = ragged_paged_attention_reference(
        q, k, v, tables, seq_lens, qsl, scale=scale, layout=layout
    )
    assert out.shape == q.shape
    assert_close(out, ref)


@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_write_kv_matches_reference(layout):
    """20 tokens to distinct slots of blocks 1-5 and 8 padding tokens (slots of the null block
    0, repeated), interleaved: the real slots hold the new K/V, nothing else changes."""
    rng = np.random.default_rng(7)
    nb, bs, kh, d = 6, 16, 2, 64
    shape = kv_cache_shape(layout, nb, bs, kh, d)
    kc = jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
    vc = jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
    real = bs + rng.permutation((nb - 1) * bs)[:20]
    slots_np = np.insert(real, [0, 3, 3, 9, 15, 20, 20, 20], [0, 0, 5, 0, 15, 0, 0, 1])
    slots = jnp.asarray(slots_np.astype(np.int32))
    k = jnp.asarray(rng.standard_normal((28, kh, d)), jnp.bfloat16)
    v = jnp.asarray(rng.standard_normal((28, kh, d)), jnp.bfloat16)
    got = jax.jit(lambda *a: write_kv(*a, layout=layout), donate_argnums=(0, 1))(
        kc.copy(), vc.copy(), k, v, slots
    )
    want = write_kv_reference(kc, vc, k, v, slots, layout=layout)
    for g, w, old, new in zip(got, want, (kc, vc), (k, v), strict=True):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
        g, old = np.asarray(g), np.asarray(old)
        if layout == "HND":  # compare token-major: [blocks, block_size, K, D]
            g, old = g.swapaxes(1, 2), old.swapaxes(1, 2)
        g, old = g.reshape(nb * bs, kh, d), old.reshape(nb * bs, kh, d)
        is_real = slots_np >= bs
        np.testing.assert_array_equal(g[slots_np[is_real]], np.asarray(new)[is_real])
        untouched = np.setdiff1d(np.arange(nb * bs), slots_np[is_real])
        np.testing.assert_array_equal(g[untouched], old[untouched])  # null block included


def test_validation_names_the_bad_shape():
    k = jnp.zeros((4, 16, 2, 64), jnp.bfloat16)
    tables = jnp.zeros((2, 3), jnp.int32)
    lens = jnp.ones((2,), jnp.int32)
    with pytest.raises(ValueError, match=r"num_heads=3 is not a multiple of num_kv_heads=2"):
        decode_paged_attention(jnp.zeros((2, 3, 64), jnp.bfloat16), k, k, tables, lens, scale=1.0)
    with pytest.raises(ValueError, match=r"q must be \[T, num_heads, 64\]"):
        decode_paged_attention(jnp.zeros((2, 4, 32), jnp.bfloat16), k, k, tables, lens, scale=1.0)
    with pytest.raises(ValueError, match=r"seq_lens must be i32\[2\]"):
        decode_paged_attention(
            jnp.zeros((2, 4, 64), jnp.bfloat16), k, k, tables, jnp.ones((3,), jnp.int32), scale=1.0
        )
    with pytest.raises(ValueError, match=r"query_start_loc must be i32\[3\]"):
        ragged_paged_attention(
            jnp.zeros((5, 4, 64), jnp.bfloat16), k, k, tables, lens, jnp.zeros((2,), jnp.int32),
            scale=1.0,
        )  # fmt: skip
    with pytest.raises(ValueError, match=r"head_dim=96 must be a multiple of 64"):
        k96 = jnp.zeros((4, 16, 2, 96), jnp.bfloat16)
        decode_paged_attention(
            jnp.zeros((2, 4, 96), jnp.bfloat16), k96, k96, tables, lens, scale=1.0
        )
