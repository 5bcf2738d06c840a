"""The Mosaic GPU paged-attention kernel shared by decode and ragged prefill.

One program handles one *tile* (up to `tokens_per_tile` query tokens of one request) for one
KV head and one split of its keys. The tile's rows are (token, q head in the group) pairs, so
a tile is tokens_per_tile * G <= 64 rows, padded to the 64 rows of one wgmma:

    q_t[kv_head, t * G + g, :]          queries, head-major, rows of one KV head contiguous
    keys of step j  = pages bt[req, j*P : (j+1)*P]  each copied by TMA into one SMEM tile
                      [block_kv, head_dim] (P = block_kv // block_size pages per step)

Per step: S = Q K^T (wgmma), causal/length mask, online softmax in the exp2 domain, then
O += P V (wgmma, P staged through SMEM). TMA copies run `num_stages` steps ahead. V rows past
the context are zeroed in SMEM on the last step so NaN in unused slots cannot reach O.
Tile metadata (request, first token, token count, first position) is computed by the callers.
"""

from __future__ import annotations

import math

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
from jax import lax

from pallas_kernels.tuning import KernelConfig

ROWS = 64  # wgmma M: query rows per program
LOG2E = math.log2(math.e)
_WG = plgpu.Layout.WGMMA


def _make_kernel(
    *, group, tokens_per_tile, head_dim, block_size, cfg, layout, dtype, scale, p_in_registers
):
    bk, stages, splits = cfg.block_kv, cfg.num_stages, cfg.num_splits
    pages_per_step = bk // block_size
    q_rows = tokens_per_tile * group

    def kernel(meta_ref, bt_ref, q_ref, k_ref, v_ref, *refs):
        # meta_ref i32[4, num_tiles]; bt_ref i32[R, max_blocks]; q_ref [K, rows_total, D]
        if splits == 1:
            (o_ref,), lse_ref, scratch = refs[:1], None, refs[1:]
        else:
            (o_ref, lse_ref), scratch = refs[:2], refs[2:]
        if p_in_registers:
            scratch = scratch[:2] + (None,) + tuple(scratch[2:])
        q_stage, q_smem, p_smem, k_smem, v_smem, lse_smem, q_bar, k_bar, v_bar = scratch
        o_smem = q_stage  # free once Q is in its swizzled buffer
        tile, h, split = (lax.axis_index(n) for n in ("tile", "kv_head", "split"))
        req, t0, ntok, p0 = (meta_ref[i, tile] for i in range(4))
        kv_len = jnp.where(ntok > 0, jnp.maximum(p0 + ntok, 0), 0)
        n_steps = lax.div(kv_len + (bk - 1), bk)
        per_split = lax.div(n_steps + (splits - 1), splits)
        first = split * per_split
        my_steps = jnp.maximum(jnp.minimum(first + per_split, n_steps) - first, 0)

        def page(cache, blk):  # one (block, kv head) page: [block_size, head_dim]
            return cache.at[blk, :, h, :] if layout == "NHD" else cache.at[blk, h]

        def issue(j):  # start the TMA copies of this program's step j
            slot = lax.rem(j, stages)
            for i in range(pages_per_step):
                blk = bt_ref[req, (first + j) * pages_per_step + i]
                rows = pl.ds(i * block_size, block_size)
                plgpu.copy_gmem_to_smem(page(k_ref, blk), k_smem.at[slot, rows], k_bar.at[slot])
                plgpu.copy_gmem_to_smem(page(v_ref, blk), v_smem.at[slot, rows], v_bar.at[slot])

        for j in range(stages):
            pl.when(j < my_steps)(lambda j=j: issue(jnp.int32(j)))

        # Queries: TMA the tile's rows into an untiled stage, then copy into the swizzled
        # wgmma operand (a partial tile of G < 8 rows cannot be TMA'd into a tiled buffer).
        if q_rows < ROWS:
            q_stage[...] = plgpu.layout_cast(jnp.zeros((ROWS, head_dim), dtype), _WG)
            plgpu.commit_smem()
        plgpu.copy_gmem_to_smem(
            q_ref.at[h, pl.ds(t0 * group, q_rows)], q_stage.at[pl.ds(0, q_rows)], q_bar
        )
        plgpu.barrier_wait(q_bar)
        q_smem[...] = plgpu.load(q_stage, layout=_WG)
        plgpu.commit_smem()

        row_tok = lax.div(plgpu.broadcasted_iota(jnp.int32, (ROWS, bk), 0, layout=_WG), group)
        col = plgpu.broadcasted_iota(jnp.int32, (ROWS, bk), 1, layout=_WG)
        vrow = plgpu.broadcasted_iota(jnp.int32, (bk, head_dim), 0, layout=_WG)
        carry0 = (
            plgpu.layout_cast(jnp.full((ROWS, head_dim), 0.0, jnp.float32), _WG),
            plgpu.layout_cast(jnp.full((ROWS,), -1e30, jnp.float32), _WG.reduce(1)),
            plgpu.layout_cast(jnp.full((ROWS,), 0.0, jnp.float32), _WG.reduce(1)),
        )

        def step(j, carry):
            acc, m_i, l_i = carry
            slot = lax.rem(j, stages)
            key0 = (first + j) * bk
            plgpu.barrier_wait(k_bar.at[slot])

            def qk(s_ref):
                plgpu.wgmma(s_ref, q_smem, k_smem.at[slot].T)
                return s_ref[...]

            s = pl.run_scoped(qk, plgpu.ACC((ROWS, bk), jnp.float32)) * (scale * LOG2E)
            key = col + key0
            s = jnp.where((key <= row_tok + p0) & (key < kv_len), s, -jnp.inf)
            m_new = jnp.maximum(m_i, s.max(axis=1))
            alpha = jnp.exp2(m_i - m_new)
            p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
            l_i = l_i * alpha + p.sum(axis=1)
            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
            plgpu.barrier_wait(v_bar.at[slot])

            @pl.when(key0 + bk > kv_len)
            def _zero_v_tail():
                v = plgpu.load(v_smem.at[slot], layout=_WG)
                v_smem.at[slot][...] = jnp.where(vrow + key0 < kv_len, v, jnp.zeros_like(v))
                plgpu.commit_smem()

            if p_in_registers:  # P as the register A operand (not in interpret mode)

                def pv_acc(acc_ref):
                    plgpu.wgmma(acc_ref, p.astype(dtype), v_smem.at[slot])

                acc = pl.run_state(pv_acc)(plgpu.ACC.init(acc))
            else:  # P staged through SMEM

                def pv(o_ref_):
                    p_smem[...] = p.astype(dtype)
                    plgpu.commit_smem()
                    plgpu.wgmma(o_ref_, p_smem, v_smem.at[slot])
                    return o_ref_[...]

                acc = acc + pl.run_scoped(pv, plgpu.ACC((ROWS, head_dim), jnp.float32))
            pl.when(j + stages < my_steps)(lambda: issue(j + stages))
            return acc, m_new, l_i

        acc, m_i, l_i = lax.fori_loop(0, my_steps, step, carry0)
        ok = l_i > 0
        inv = jnp.where(ok, 1.0 / jnp.where(ok, l_i, 1.0), 0.0)
        o_smem[...] = (acc * lax.broadcast_in_dim(inv, acc.shape, [0])).astype(o_smem.dtype)
        if lse_ref is not None:
            lse_smem[...] = jnp.where(ok, m_i + jnp.log2(jnp.where(ok, l_i, 1.0)), -jnp.inf)
        plgpu.commit_smem()
        _store(o_smem, o_ref, lse_smem, lse_ref, h, split, t0, ntok, group, tokens_per_tile)
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    return kernel


def _store(o_smem, o_ref, lse_smem, lse_ref, h, split, t0, ntok, group, tokens_per_tile):
    if lse_ref is not None:  # split-K decode: one token per tile, partial results

        @pl.when(ntok > 0)
        def _():
            plgpu.copy_smem_to_gmem(
                o_smem.at[pl.ds(0, group)], o_ref.at[split, h, pl.ds(t0 * group, group)]
            )
            plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[split, h, t0])

        return
    # A ladder of static-size stores (n = 2^k tokens where bit k of ntok is set) so that a
    # partial tile never writes rows of the next request.
    n, off = 1 << (tokens_per_tile.bit_length() - 1), 0
    while n > 0:

        @pl.when((ntok & n) != 0)
        def _(n=n, off=off):
            src = o_smem.at[pl.ds(off * group, n * group)]
            plgpu.copy_smem_to_gmem(src, o_ref.at[h, pl.ds((t0 + off) * group, n * group)])

        off = off + (ntok & n)
        n //= 2


def paged_attention_call(
    meta: jax.Array,  # i32[4, num_tiles]: request, first token, tokens, first position
    block_tables: jax.Array,  # i32[R, max_blocks], max_blocks a multiple of block_kv // block_size
    q_t: jax.Array,  # [K, rows_total, D], row t * G + g
    k_cache: jax.Array,  # pool, layout `layout`
    v_cache: jax.Array,
    *,
    group: int,
    tokens_per_tile: int,
    block_size: int,
    scale: float,
    layout: str,
    config: KernelConfig,
    num_tokens: int,
    interpret: bool = False,
):
    """Returns o_t [K, num_tokens * G, D] (splits == 1) or, for split-K, (o_part [S, K,
    num_tokens * G, D] in q's dtype, normalized per split, and lse f32[S, K, num_tokens, 64])."""
    kh, _, d = q_t.shape
    dtype, splits, bk, stages = q_t.dtype, config.num_splits, config.block_kv, config.num_stages
    # Mosaic GPU interpret mode has no register-operand wgmma: P goes through SMEM there.
    p_in_registers = config.p_in_registers and not interpret
    kernel = _make_kernel(
        group=group, tokens_per_tile=tokens_per_tile, head_dim=d, block_size=block_size,
        cfg=config, layout=layout, dtype=dtype, scale=scale, p_in_registers=p_in_registers,
    )  # fmt: skip
    tiled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    scratch = [
        plgpu.SMEM((ROWS, d), dtype),  # Q stage (untiled), then O stage
        plgpu.SMEM((ROWS, d), dtype, transforms=tiled),  # Q operand
        plgpu.SMEM((ROWS, bk), dtype, transforms=tiled),  # P (unless in registers)
        plgpu.SMEM((stages, bk, d), dtype, transforms=tiled),  # K tiles
        plgpu.SMEM((stages, bk, d), dtype, transforms=tiled),  # V tiles
        plgpu.SMEM((ROWS,), jnp.float32),  # log2-sum-exp stage
        plgpu.Barrier(num_barriers=1),
        plgpu.Barrier(num_arrivals=bk // block_size, num_barriers=stages),
        plgpu.Barrier(num_arrivals=bk // block_size, num_barriers=stages),
    ]
    if p_in_registers:
        del scratch[2]
    rows_out = num_tokens * group
    if splits == 1:
        out_type = jax.ShapeDtypeStruct((kh, rows_out, d), dtype)
    else:
        out_type = (
            jax.ShapeDtypeStruct((splits, kh, rows_out, d), dtype),
            jax.ShapeDtypeStruct((splits, kh, num_tokens, ROWS), jnp.float32),
        )
    call = plgpu.kernel(
        kernel,
        out_type=out_type,
        scratch_types=scratch,
        grid=(meta.shape[1], kh, splits),
        grid_names=("tile", "kv_head", "split"),
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=plgpu.InterpretGPUParams() if interpret else None,
    )
    return call(meta, block_tables, q_t, k_cache, v_cache)
