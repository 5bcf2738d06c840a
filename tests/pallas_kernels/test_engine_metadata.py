"""PallasBackend against ReferenceBackend on metadata built by the runner's own InputBatch.prepare
at the agreement benchmark's attention shape (GQA 4, head_dim 128, block 16,
max_model_len 2048 -> block tables 128 wide), so every quirk of the engine's padding is in play:
padding rows (seq_len 0, query_start_loc repeating the total), padding tokens (slot 0 in the null
block, token_req_idx = last row), chunks that start mid-block, decode rows inside a mixed step,
and decode buckets with padding rows (split-K chosen by decode_config)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpaged.attention.metadata import AttentionMetadata
from jaxpaged.attention.pallas import PallasBackend
from jaxpaged.attention.reference import ReferenceBackend
from jaxpaged.runner.input_batch import InputBatch

BS, KH, G, D, MAX_MODEL_LEN = 16, 1, 4, 128, 2048


def engine_step(rng, reqs, num_tokens, num_reqs, decode_only):
    """reqs: (num_computed_tokens, num_scheduled) per request, blocks scattered over the pool."""
    batch = InputBatch(max_num_seqs=32, max_model_len=MAX_MODEL_LEN, block_size=BS, vocab_size=8)
    need = [-(-(s + c) // BS) for s, c in reqs]
    num_blocks = sum(need) + 4
    perm, used = rng.permutation(np.arange(1, num_blocks)), 0
    for slot, n in enumerate(need):
        batch.block_table[slot, :n] = perm[used : used + n]
        batch.num_blocks[slot] = n
        batch.num_tokens[slot] = sum(reqs[slot])
        used += n
    hs = batch.prepare(
        np.arange(len(reqs), dtype=np.int32),
        np.array([s for s, _ in reqs], np.int32),
        np.array([c for _, c in reqs], np.int32),
        num_tokens,
        num_reqs,
    )
    assert hs.block_tables.shape == (num_reqs, MAX_MODEL_LEN // BS)
    md = AttentionMetadata(
        slot_mapping=jnp.asarray(hs.slot_mapping),
        query_start_loc=jnp.asarray(hs.query_start_loc),
        seq_lens=jnp.asarray(hs.seq_lens),
        block_tables=jnp.asarray(hs.block_tables),
        token_req_idx=jnp.asarray(hs.token_req_idx),
        decode_only=decode_only,
    )
    return md, num_blocks, hs.num_tokens


@pytest.mark.parametrize(
    "reqs,num_tokens,num_reqs,decode_only",
    [
        # mixed: decode rows, a chunk finishing mid-block, fresh and mid-block prefill chunks;
        # 85 real tokens of 128 and 6 real rows of 16
        ([(5, 1), (17, 1), (296, 4), (0, 40), (33, 9), (100, 30)], 128, 16, False),
        # decode bucket of 8 with 3 padding rows (split-K over the 2048-key capacity)
        ([(5, 1), (900, 1), (33, 1), (511, 1), (130, 1)], 8, 8, True),
    ],
)
def test_pallas_matches_reference_on_runner_metadata(reqs, num_tokens, num_reqs, decode_only):
    rng = np.random.default_rng(7)
    md, nb, real = engine_step(rng, reqs, num_tokens, num_reqs, decode_only)
    q = jnp.asarray(rng.standard_normal((num_tokens, KH * G, D)), jnp.bfloat16)
    k = jnp.asarray(rng.standard_normal((num_tokens, KH, D)), jnp.bfloat16)
    v = jnp.asarray(rng.standard_normal((num_tokens, KH, D)), jnp.bfloat16)
    pallas, ref = PallasBackend(interpret=True), ReferenceBackend()
    # Stale finite history everywhere (the engine's pool starts zeroed; this is harsher).
    cache = jnp.asarray(rng.standard_normal(ref.kv_cache_shape(nb, BS, KH, D)), jnp.bfloat16)

    def step(backend):
        f = jax.jit(lambda c, q, k, v, md: backend(q, k, v, c, md, D**-0.5), donate_argnums=0)
        return f((cache.copy(), cache.copy()), q, k, v, md)

    out, (kc, vc) = step(pallas)
    want, (kc_ref, vc_ref) = step(ref)
    np.testing.assert_array_equal(np.asarray(kc[1:]), np.asarray(kc_ref[1:]))
    np.testing.assert_array_equal(np.asarray(vc[1:]), np.asarray(vc_ref[1:]))
    got, exp = (np.asarray(x[:real], np.float32) for x in (out, want))
    np.testing.assert_allclose(got, exp, atol=3e-2, rtol=3e-2)
    assert np.linalg.norm(got - exp) / np.linalg.norm(exp) < 1e-2
