"""PallasBackend (kernels in interpret mode) against ReferenceBackend through the jaxpaged
interface: jitted, caches donated, a decode-only step and a mixed prefill/decode step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpaged.attention.metadata import AttentionMetadata
from jaxpaged.attention.pallas import PallasBackend
from jaxpaged.attention.reference import ReferenceBackend

BS, KH, G, D, NB = 16, 2, 4, 64, 12


def metadata(rng, ctx_before, q_lens, pad_tokens, decode_only):
    """Requests with `ctx_before` cached tokens each get q_lens new tokens in fresh slots."""
    r = len(q_lens)
    seq_lens = np.array(ctx_before) + np.array(q_lens)
    max_blocks = int(-(-seq_lens.max() // BS))
    perm = rng.permutation(np.arange(1, NB))
    tables, c = np.zeros((r, max_blocks), np.int32), 0
    for i, n in enumerate(seq_lens):
        p = -(-int(n) // BS)
        tables[i, :p] = perm[c : c + p]
        c += p
    slots, req_idx = [], []
    for i, (n0, nq) in enumerate(zip(ctx_before, q_lens, strict=True)):
        for pos in range(n0, n0 + nq):
            slots.append(tables[i, pos // BS] * BS + pos % BS)
            req_idx.append(i)
    slots += [0] * pad_tokens  # padding tokens write into the null block
    req_idx += [r - 1] * pad_tokens
    qsl = np.concatenate([[0], np.cumsum(q_lens)])
    i32 = lambda x: jnp.asarray(np.asarray(x, np.int32))  # noqa: E731
    return AttentionMetadata(
        slot_mapping=i32(slots),
        query_start_loc=i32(qsl),
        seq_lens=i32(seq_lens),
        block_tables=i32(tables),
        token_req_idx=i32(req_idx),
        decode_only=decode_only,
    )


@pytest.mark.parametrize(
    "ctx_before,q_lens,pad,decode_only",
    [([5, 40, 17], [1, 1, 1], 0, True), ([0, 30, 9], [20, 1, 7], 4, False)],
)
def test_pallas_backend_matches_reference(ctx_before, q_lens, pad, decode_only):
    rng = np.random.default_rng(3)
    md = metadata(rng, ctx_before, q_lens, pad, decode_only)
    t = md.num_tokens
    q = jnp.asarray(rng.standard_normal((t, KH * G, D)), jnp.bfloat16)
    k = jnp.asarray(rng.standard_normal((t, KH, D)), jnp.bfloat16)
    v = jnp.asarray(rng.standard_normal((t, KH, D)), jnp.bfloat16)
    pallas, ref = PallasBackend(interpret=True), ReferenceBackend()
    shape = pallas.kv_cache_shape(NB, BS, KH, D)
    assert shape == ref.kv_cache_shape(NB, BS, KH, D)
    cache = jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)  # stale history, finite

    def step(backend):
        f = jax.jit(lambda c, q, k, v, md: backend(q, k, v, c, md, D**-0.5), donate_argnums=0)
        return f((cache.copy(), cache.copy()), q, k, v, md)

    out, (kc, vc) = step(pallas)
    want, (kc_ref, vc_ref) = step(ref)
    real = int(md.query_start_loc[-1])
    np.testing.assert_array_equal(np.asarray(kc[1:]), np.asarray(kc_ref[1:]))
    np.testing.assert_array_equal(np.asarray(vc[1:]), np.asarray(vc_ref[1:]))
    np.testing.assert_allclose(
        np.asarray(out[:real], np.float32),
        np.asarray(want[:real], np.float32),
        atol=3e-2,
        rtol=3e-2,
    )
