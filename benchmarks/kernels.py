"""Paged-attention kernel benchmark: one run on one GPU answers the kernel issue's questions.

    PYTHONPATH=. python3 benchmarks/kernels.py --mode check+final --out $OUT

Modes: `check` (GPU agreement with the references), `tune` (layouts and tile configs at a few
points), `final` (the Llama-3-8B grid against JAX's stock Pallas kernel, an XLA gather+einsum
path and cuDNN on contiguous KV, with the copy and matmul ceilings measured in the same run).
Times are device time summed over the kernels of one call (CUPTI), median over repeats, with
inputs rotated among enough page sets that each call reads from HBM, not L2.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import (
    KernelConfig,
    decode_config,
    decode_paged_attention,
    decode_paged_attention_reference,
    kv_cache_shape,
    ragged_paged_attention,
    ragged_paged_attention_reference,
    write_kv,
)

H, K, D, BS = 32, 8, 128, 16  # Llama-3-8B attention, 16-token blocks
DT = jnp.bfloat16
L2_BYTES = 50 * 2**20


def device_ms(fn, arg_sets, reps=5):
    """Median device time (ms) of one call, summed over its kernels (CUPTI)."""
    for a in arg_sets:
        jax.block_until_ready(fn(*a))
    try:
        from jax._src.lib import mosaic_gpu as mgpu_lib

        ext = mgpu_lib._mosaic_gpu_ext
        ext._cupti_init()
        n, outs = 0, []
        try:
            for _ in range(reps):
                for a in arg_sets:
                    outs.append(fn(*a))
                    n += 1
            jax.block_until_ready(outs)
        finally:
            timings = ext._cupti_get_timings(True)
        per = len(timings) // n
        totals = [sum(t for _, t in timings[i * per : (i + 1) * per]) for i in range(n)]
        return statistics.median(totals)
    except Exception as e:  # wall clock fallback
        print("CUPTI unavailable, wall clock:", e, file=sys.stderr)
        t = time.perf_counter()
        for _ in range(reps):
            for a in arg_sets:
                out = fn(*a)
        jax.block_until_ready(out)
        return (time.perf_counter() - t) * 1e3 / (reps * len(arg_sets))


def copy_ceiling():
    x = jax.random.normal(jax.random.key(0), (2**30,), DT)  # 2 GiB
    f = jax.jit(lambda x: x * 2)
    ms = device_ms(f, [(x,)], reps=5)
    del x
    return 2 * 2**31 / (ms * 1e-3)


def matmul_rate():
    a = jax.random.normal(jax.random.key(1), (8192, 8192), DT)
    b = jax.random.normal(jax.random.key(2), (8192, 8192), DT)
    ms = device_ms(jax.jit(jnp.dot), [(a, b)], reps=5)
    return 2 * 8192**3 / (ms * 1e-3)


class Pool:
    """Fragmented pages for `n_sets` independent copies of a batch (to defeat L2 reuse)."""

    def __init__(self, lens, layout="NHD", n_sets=None, seed=0, bs=BS):
        rng = np.random.default_rng(seed)
        self.lens = np.asarray(lens, np.int32)
        pages = -(-self.lens // bs)
        kv_bytes = int(self.lens.sum()) * K * D * 2 * 2
        self.n_sets = n_sets or int(min(32, max(2, math.ceil(3 * L2_BYTES / max(kv_bytes, 1)))))
        self.mb = int(-(-pages.max() // 8) * 8)
        need = int(pages.sum()) * self.n_sets
        self.nb = need + 1
        perm = rng.permutation(np.arange(1, self.nb)).astype(np.int32)
        self.bts, c = [], 0
        for _ in range(self.n_sets):
            bt = np.zeros((len(lens), self.mb), np.int32)
            for b, n in enumerate(pages):
                bt[b, :n] = perm[c : c + n]
                c += n
            self.bts.append(jnp.asarray(bt))
        shape = kv_cache_shape(layout, self.nb, bs, K, D)
        self.k = jax.random.normal(jax.random.key(seed + 1), shape, DT)
        self.v = jax.random.normal(jax.random.key(seed + 2), shape, DT)
        self.sl = jnp.asarray(self.lens)
        self.kv_bytes = kv_bytes


def xla_decode(q, kc, vc, bt, sl, scale):
    """Gather the pages then einsum, in bf16 with f32 accumulation (NHD pool)."""
    b = q.shape[0]
    keys = kc[bt].reshape(b, -1, K, D)
    vals = vc[bt].reshape(b, -1, K, D)
    qg = q.reshape(b, K, H // K, D)
    s = jnp.einsum("bkgd,bskd->bkgs", qg, keys, preferred_element_type=jnp.float32) * scale
    s = jnp.where(jnp.arange(keys.shape[1])[None, None, None] < sl[:, None, None, None], s, -1e30)
    p = jax.nn.softmax(s, axis=-1).astype(DT)
    return jnp.einsum("bkgs,bskd->bkgd", p, vals).reshape(q.shape)


def stock_fn():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from jax.experimental.pallas.ops.gpu import paged_attention as stock
    return jax.jit(
        lambda q, kp, vp, bt, sl: stock.paged_attention(
            q, kp, vp, bt, sl, k_splits=1, pages_per_compute_block=8
        )
    )


def decode_point(lens, rng, methods, ours_cfg=None, layout="NHD", pool=None):
    pool = pool or Pool(lens, layout)
    b, scale = len(lens), D**-0.5
    q = jnp.asarray(rng.standard_normal((b, H, D)), DT)
    useful = pool.kv_bytes + 2 * q.size * 2
    res = {}
    ours = jax.jit(
        lambda q, k, v, bt, sl: decode_paged_attention(
            q, k, v, bt, sl, scale=scale, layout=layout, config=ours_cfg
        )
    )
    for name in methods:
        try:
            if name == "ours":
                sets = [(q, pool.k, pool.v, bt, pool.sl) for bt in pool.bts]
                ms = device_ms(ours, sets)
            elif name == "stock":
                kp, vp = (x.transpose(2, 0, 1, 3) for x in (pool.k, pool.v))
                sets = [(q * scale, kp, vp, bt, pool.sl) for bt in pool.bts]
                ms = device_ms(stock_fn(), sets)
                del kp, vp
            elif name == "xla":
                f = jax.jit(lambda *a: xla_decode(*a, scale))
                ms = device_ms(f, [(q, pool.k, pool.v, bt, pool.sl) for bt in pool.bts[:2]])
            elif name == "cudnn":
                s = int(pool.lens.max())
                keys = jax.random.split(jax.random.key(3), 2 * pool.n_sets)
                kv = [jax.random.normal(kk, (b, s, K, D), DT) for kk in keys]
                f = jax.jit(
                    lambda q, kk, vv, sl: jax.nn.dot_product_attention(
                        q[:, None],
                        kk,
                        vv,
                        query_seq_lengths=jnp.ones_like(sl),
                        key_value_seq_lengths=sl,
                        implementation="cudnn",
                    )
                )
                ms = device_ms(
                    f, [(q, kv[2 * i], kv[2 * i + 1], pool.sl) for i in range(pool.n_sets)]
                )
                del kv
            res[name] = (ms, useful / (ms * 1e-3))
        except Exception as e:
            print(f"  {name} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
            res[name] = (float("nan"), float("nan"))
    return res


def prefill_point(chunk, history, rng, cfg=None, layout="NHD", reqs=1):
    lens = [chunk + history] * reqs
    pool = Pool(lens, layout, n_sets=2)
    t = chunk * reqs
    q = jnp.asarray(rng.standard_normal((t, H, D)), DT)
    qsl = jnp.arange(reqs + 1, dtype=jnp.int32) * chunk
    f = jax.jit(
        lambda q, k, v, bt, sl, qsl: ragged_paged_attention(
            q, k, v, bt, sl, qsl, scale=D**-0.5, layout=layout, config=cfg
        )
    )
    ms = device_ms(f, [(q, pool.k, pool.v, bt, pool.sl, qsl) for bt in pool.bts])
    pairs = reqs * sum(history + i + 1 for i in range(chunk))
    return ms, 4 * D * H * pairs / (ms * 1e-3)


def kv_write_point(t, layout="NHD"):
    pool = Pool([8192] * 64, layout, n_sets=1)
    k = jnp.ones((t, K, D), DT)
    slots = jnp.asarray(np.random.default_rng(0).permutation(pool.nb * BS)[:t].astype(np.int32))
    f = jax.jit(
        lambda kc, vc, k, s: write_kv(kc, vc, k, k, s, layout=layout), donate_argnums=(0, 1)
    )
    kc, vc = pool.k, pool.v
    for _ in range(2):
        kc, vc = f(kc, vc, k, slots)
    jax.block_until_ready(kc)
    from jax._src.lib import mosaic_gpu as mgpu_lib

    ext = mgpu_lib._mosaic_gpu_ext
    ext._cupti_init()
    for _ in range(5):
        kc, vc = f(kc, vc, k, slots)
    jax.block_until_ready(kc)
    timings = ext._cupti_get_timings(True)
    return sum(x for _, x in timings) / 5


def check(rng):
    """GPU kernel vs reference on fragmented pools (bf16 in, f32 reference)."""
    worst = 0.0
    for layout in ("NHD", "HND"):
        for g, d, bs in ((4, 128, 16), (8, 64, 32), (1, 128, 16)):
            kh = 2
            lens = [1, 15, 16, 17, 300, 1000, 0, 64]
            nb = sum(-(-n // bs) for n in lens) + 4
            mb = max(-(-n // bs) for n in lens) + 2
            perm = rng.permutation(np.arange(1, nb))
            bt, c = np.zeros((len(lens), mb), np.int32), 0
            for i, n in enumerate(lens):
                p = -(-n // bs)
                bt[i, :p] = perm[c : c + p]
                c += p
            shape = kv_cache_shape(layout, nb, bs, kh, d)
            kc = jnp.asarray(rng.standard_normal(shape), DT)
            vc = jnp.asarray(rng.standard_normal(shape), DT)
            q = jnp.asarray(rng.standard_normal((len(lens), kh * g, d)), DT)
            bt, sl = jnp.asarray(bt), jnp.asarray(np.array(lens, np.int32))
            ref = decode_paged_attention_reference(q, kc, vc, bt, sl, scale=d**-0.5, layout=layout)
            for splits, bk, reg in ((1, 64, True), (1, 128, False), (4, 64, True), (3, 128, True)):
                cfg = KernelConfig(block_kv=bk, num_splits=splits, p_in_registers=reg)
                o = decode_paged_attention(
                    q, kc, vc, bt, sl, scale=d**-0.5, layout=layout, config=cfg
                )
                err = float(jnp.abs(o.astype(jnp.float32) - ref.astype(jnp.float32)).max())
                worst = max(worst, err)
                print(f"check decode {layout} g={g} d={d} bs={bs} {cfg}: max|err|={err:.4f}")
            qlens = np.minimum([1, 15, 16, 17, 200, 300, 0, 64], lens)
            qsl = jnp.asarray(np.concatenate([[0], np.cumsum(qlens)]).astype(np.int32))
            t = int(qsl[-1])
            qr = jnp.asarray(rng.standard_normal((t, kh * g, d)), DT)
            ref = ragged_paged_attention_reference(
                qr, kc, vc, bt, sl, qsl, scale=d**-0.5, layout=layout
            )
            for bk, reg in ((64, True), (128, True), (64, False)):
                cfg = KernelConfig(block_kv=bk, p_in_registers=reg)
                o = ragged_paged_attention(
                    qr, kc, vc, bt, sl, qsl, scale=d**-0.5, layout=layout, config=cfg
                )
                err = float(jnp.abs(o.astype(jnp.float32) - ref.astype(jnp.float32)).max())
                worst = max(worst, err)
                print(f"check ragged {layout} g={g} d={d} bs={bs} {cfg}: max|err|={err:.4f}")
    print(f"check worst max|err| = {worst:.4f}")
    return worst


def tune(rng, out):
    """Tile configs (block_kv, stages, P in registers or SMEM) and split counts."""
    rows = []
    variants = [(64, 2, True), (64, 3, True), (128, 2, True), (64, 2, False), (128, 2, False)]
    for b, ctx in [(32, 2048), (128, 8192), (1, 8192), (8, 2048), (128, 512), (64, 2048)]:
        base = decode_config(b, K, D, BS, -(-ctx // BS // 8) * 8 * BS)
        pool = Pool([ctx] * b)
        for bk, st, reg in variants:
            cfg = KernelConfig(bk, st, base.num_splits, reg)
            r = decode_point([ctx] * b, rng, ["ours"], cfg, pool=pool)["ours"]
            rows.append(dict(b=b, ctx=ctx, bk=bk, st=st, reg=reg, splits=cfg.num_splits, ms=r[0]))
            print(rows[-1], flush=True)
        for sp in sorted({max(1, base.num_splits // 2), base.num_splits * 2} - {base.num_splits}):
            for bk in (64, 128):
                cfg = KernelConfig(block_kv=bk, num_splits=sp)
                r = decode_point([ctx] * b, rng, ["ours"], cfg, pool=pool)["ours"]
                rows.append(dict(b=b, ctx=ctx, bk=bk, st=2, reg=True, splits=sp, ms=r[0]))
                print(rows[-1], flush=True)
        del pool
    for bk, st, reg in variants:
        ms, fl = prefill_point(2048, 2048, rng, KernelConfig(bk, st, 1, reg))
        rows.append(dict(prefill=True, bk=bk, st=st, reg=reg, ms=ms, tflops=fl / 1e12))
        print(rows[-1], flush=True)
    json.dump(rows, open(f"{out}/tune.json", "w"), indent=1)


def final(rng, out):
    copy_bw, mm = copy_ceiling(), matmul_rate()
    print(
        f"copy ceiling {copy_bw / 1e12:.3f} TB/s; bf16 matmul {mm / 1e12:.0f} TFLOP/s", flush=True
    )
    rows = []
    grid = [(b, c) for b in (1, 8, 32, 64, 128) for c in (512, 2048, 8192)]
    for b, ctx in grid + [("ragged64", None), ("ragged8", None)]:
        if isinstance(b, str):
            n = int(b[6:])
            lens = rng.integers(1, 8193, n).tolist()
        else:
            lens = [ctx] * b
        methods = ["ours", "stock", "xla", "cudnn"]
        if len(lens) * max(lens) > 64 * 8192:
            methods.remove("xla")  # the dense gather would not fit beside the pools
        r = decode_point(lens, rng, methods)
        row = dict(batch=b, ctx=ctx if ctx else "1..8192", **{k: v[0] for k, v in r.items()})
        row.update({f"{k}_pct": 100 * v[1] / copy_bw for k, v in r.items()})
        rows.append(row)
        print(row, flush=True)
    pf = [dict(chunk=2048, history=2048, reqs=1), dict(chunk=512, history=1536, reqs=4)]
    for p in pf:
        ms, fl = prefill_point(p["chunk"], p["history"], rng, reqs=p["reqs"])
        p.update(ms=ms, tflops=fl / 1e12, pct_matmul=100 * fl / mm)
        print(p, flush=True)
    kvw = {t: kv_write_point(t) for t in (128, 2048)}
    summary = dict(
        copy_tbs=copy_bw / 1e12,
        matmul_tflops=mm / 1e12,
        decode=rows,
        prefill=pf,
        kv_write_ms=kvw,
        jax=jax.__version__,
        device=str(jax.devices()[0].device_kind),
    )
    json.dump(summary, open(f"{out}/final.json", "w"), indent=1)
    print_table(summary)


def print_table(summary):
    nan = float("nan")
    print(
        f"\ndevice {summary['device']}, jax {summary['jax']}, copy "
        f"{summary['copy_tbs']:.2f} TB/s, bf16 matmul {summary['matmul_tflops']:.0f} TFLOP/s"
    )
    head = ["batch", "ctx", "ours us", "%copy", "stock us", "%copy", "xla us", "%copy"]
    print(" ".join(f"{h:>9}" for h in head + ["cudnn us", "%copy", "stock/ours"]))
    for r in summary["decode"]:
        cells = [str(r["batch"]), str(r["ctx"])]
        for m in ("ours", "stock", "xla", "cudnn"):
            cells += [f"{1e3 * r.get(m, nan):.1f}", f"{r.get(m + '_pct', nan):.1f}"]
        cells.append(f"{r.get('stock', nan) / r.get('ours', nan):.2f}x")
        print(" ".join(f"{c:>9}" for c in cells))
    for p in summary["prefill"]:
        print(
            f"prefill {p['reqs']} x {p['chunk']}-token chunk, {p['history']} history: "
            f"{1e3 * p['ms']:.0f} us, {p['tflops']:.0f} TFLOP/s = {p['pct_matmul']:.0f}% of matmul"
        )
    kvw = summary["kv_write_ms"]
    print("kv write (scatter, us):", {k: round(1e3 * v, 1) for k, v in kvw.items()})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--mode",
        default="final",
        choices=["check", "tune", "final", "check+tune", "check+final", "check+tune+final"],
    )
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    print(jax.__version__, jax.devices(), flush=True)
    if "check" in args.mode:
        try:
            check(rng)
        except Exception as e:
            print(f"check failed: {type(e).__name__}: {str(e)[:3000]}", flush=True)
    if "tune" in args.mode:
        tune(rng, args.out)
    if "final" in args.mode:
        final(rng, args.out)


if __name__ == "__main__":
    main()
