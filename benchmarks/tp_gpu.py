"""Tensor parallelism on 2 GPUs: tp = 2 against tp = 1 on the Llama-3-8B shapes (issue 7).

    PYTHONPATH=. python3 benchmarks/tp_gpu.py --out $OUT            # 2-GPU machine, one call
    PYTHONPATH=. python3 benchmarks/tp_gpu.py --smoke --out /tmp/x  # CPU, tiny model, 2 devices

Each tp runs in its own subprocess (a fresh JAX, NCCL_NVLS_ENABLE=0, tp=1 sees one GPU) on
the same dummy weights (preset llama3-8b, seed 0: the unsafe_rbg initializer gives the same
values whatever the sharding). Each child measures:
- agreement: greedy tokens of M random prompts, first N steps; the parent compares tp=2 with
  tp=1 as (i) first-token agreement (same context, so a teacher-forced top-1 match),
  (ii) position-wise identical fraction, (iii) mean common prefix;
- decode step time: wall time of engine.step() over decode-only steps at several batch
  sizes (prompts of 512 tokens, prefill done before timing), i.e. what a user waits;
- throughput on workload (a): 256 sequences, input and output lengths uniform in
  [100, 1024], ignore_eos, one generate() call.
Results: tp_gpu.json and tp_gpu.md under --out; each child's JSON also stays in --work-dir,
so `--tp 1` and `--tp 2` may run in separate calls and a last `--tp` call reports both.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time

import numpy as np

logger = logging.getLogger("tp_gpu")

FULL = dict(
    preset="llama3-8b",
    agree_prompts=32,
    agree_tokens=64,
    decode_batches=(1, 16, 64, 256),
    decode_prompt=512,
    decode_steps=20,
    workload_seqs=256,
    len_lo=100,
    len_hi=1024,
    max_model_len=2048,
    max_num_seqs=256,
    max_num_batched_tokens=2048,
)
SMOKE = dict(
    preset="tiny-smoke",
    agree_prompts=4,
    agree_tokens=16,
    decode_batches=(1, 4),
    decode_prompt=24,
    decode_steps=4,
    workload_seqs=8,
    len_lo=10,
    len_hi=40,
    max_model_len=128,
    max_num_seqs=8,
    max_num_batched_tokens=64,
)
# A CPU-sized stand-in with the 8B's head structure (4 query heads per kv head).
TINY_PRESET = dict(
    model_type="llama",
    vocab_size=512,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    eos_token_id=0,
)


# ---- child: one tp size ----------------------------------------------------------------------
def _build_llm(cfg: dict, tp: int, smoke: bool, backend: str | None):
    from jaxpaged.llm import LLM
    from jaxpaged.models import loader

    if smoke:
        loader.PRESETS.setdefault("tiny-smoke", TINY_PRESET)
    extra = dict(num_kv_blocks=256) if smoke else {}
    start = time.perf_counter()
    llm = LLM(
        cfg["preset"],
        load_format="dummy",
        seed=0,
        tensor_parallel_size=tp,
        max_model_len=cfg["max_model_len"],
        max_num_seqs=cfg["max_num_seqs"],
        max_num_batched_tokens=cfg["max_num_batched_tokens"],
        attention_backend=backend,
        **extra,
    )
    return llm, time.perf_counter() - start


def _random_prompts(rng, n: int, lo: int, hi: int, vocab: int) -> list[list[int]]:
    # Token 0 upward; EOS ids do not matter since every request ignores EOS.
    return [rng.integers(1, vocab, rng.integers(lo, hi + 1)).tolist() for _ in range(n)]


def _agreement_tokens(llm, cfg: dict) -> list[list[int]]:
    from jaxpaged.sampling_params import SamplingParams

    rng = np.random.default_rng(1)
    prompts = _random_prompts(
        rng,
        cfg["agree_prompts"],
        16,
        256 if cfg["len_hi"] > 100 else 32,
        llm.config.model.vocab_size,
    )
    sp = SamplingParams(temperature=0.0, max_tokens=cfg["agree_tokens"], ignore_eos=True)
    return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, sp, use_tqdm=False)]


def _decode_step_ms(llm, cfg: dict, batch: int) -> float:
    """Median wall ms of engine.step() once `batch` requests are all decoding."""
    from jaxpaged.sampling_params import SamplingParams

    engine, rng = llm.engine, np.random.default_rng(2)
    prompt_len, steps = cfg["decode_prompt"], cfg["decode_steps"]
    sp = SamplingParams(temperature=0.0, max_tokens=4 * steps + 64, ignore_eos=True)
    ids = [f"decode-{batch}-{i}" for i in range(batch)]
    for rid in ids:
        prompt = rng.integers(1, llm.config.model.vocab_size, prompt_len).tolist()
        engine.add_request(rid, None, prompt, sp)
    prefill_steps = -(-batch * prompt_len // cfg["max_num_batched_tokens"]) + 3
    times = []
    for i in range(prefill_steps + 3 + steps):
        start = time.perf_counter()
        engine.step()  # each step fetches sampled ids, so it ends with the device
        if i >= prefill_steps + 3:
            times.append(time.perf_counter() - start)
    engine.abort_request(ids)
    while engine.has_unfinished_requests():
        engine.step()
    return 1e3 * float(np.median(times))


def _workload_a(llm, cfg: dict) -> dict:
    from jaxpaged.sampling_params import SamplingParams

    rng = np.random.default_rng(3)
    n, lo, hi = cfg["workload_seqs"], cfg["len_lo"], cfg["len_hi"]
    prompts = _random_prompts(rng, n, lo, hi, llm.config.model.vocab_size)
    outs = rng.integers(lo, hi + 1, n)
    sps = [SamplingParams(temperature=0.0, max_tokens=int(m), ignore_eos=True) for m in outs]
    start = time.perf_counter()
    results = llm.generate(prompts, sps, use_tqdm=False)
    secs = time.perf_counter() - start
    out_tokens = sum(len(r.outputs[0].token_ids) for r in results)
    in_tokens = sum(len(p) for p in prompts)
    return dict(
        seconds=secs,
        input_tokens=in_tokens,
        output_tokens=out_tokens,
        output_tok_s=out_tokens / secs,
        total_tok_s=(in_tokens + out_tokens) / secs,
    )


def child(tp: int, smoke: bool, path: str, backend: str | None) -> None:
    import jax

    cfg = SMOKE if smoke else FULL
    llm, startup = _build_llm(cfg, tp, smoke, backend)
    result = dict(
        tp=tp,
        device=str(jax.devices()[0].device_kind),
        backend=llm.backend.name,
        num_devices=tp,
        startup_s=startup,
        compile_s=llm.compile_seconds,
        kv_blocks=llm.model_runner.num_blocks,
    )
    result["agreement_tokens"] = _agreement_tokens(llm, cfg)
    result["decode_ms"] = {str(b): _decode_step_ms(llm, cfg, b) for b in cfg["decode_batches"]}
    result["workload_a"] = _workload_a(llm, cfg)
    with open(path, "w") as f:
        json.dump(result, f)
    logger.info("tp=%d done: %s", tp, {k: v for k, v in result.items() if k != "agreement_tokens"})


# ---- parent: run the children, compare, report -----------------------------------------------
def _child_path(work_dir: str, tp: int, smoke: bool) -> str:
    return os.path.join(work_dir, f"{'smoke' if smoke else 'full'}-tp{tp}.json")


def _run_child(tp: int, smoke: bool, work_dir: str, backend: str | None) -> str:
    path = _child_path(work_dir, tp, smoke)
    env = dict(os.environ, NCCL_NVLS_ENABLE="0")  # NVLink multicast stays off (KINDS.md)
    if smoke:
        env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    elif tp == 1:
        env["CUDA_VISIBLE_DEVICES"] = "0"
    cmd = [sys.executable, __file__, "--child", str(tp), "--child-out", path]
    cmd += ["--smoke"] if smoke else []
    cmd += ["--attention-backend", backend] if backend else []
    logger.info("running tp=%d: %s", tp, " ".join(cmd))
    subprocess.run(cmd, env=env, check=True)
    return path


def agreement(base: list[list[int]], other: list[list[int]]) -> dict:
    """tp=N greedy tokens against tp=1's, same prompts."""
    first = np.mean([a[0] == b[0] for a, b in zip(base, other, strict=True)])
    same = [np.mean(np.equal(a, b)) for a, b in zip(base, other, strict=True)]
    prefix = [
        next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))
        for a, b in zip(base, other, strict=True)
    ]
    return dict(
        first_token=float(first),
        positionwise=float(np.mean(same)),
        mean_common_prefix=float(np.mean(prefix)),
        tokens_per_prompt=len(base[0]),
        prompts=len(base),
    )


def report(results: dict[int, dict], out_dir: str) -> dict:
    summary = {
        "runs": {
            str(tp): {k: v for k, v in r.items() if k != "agreement_tokens"}
            for tp, r in results.items()
        }
    }
    lines = [
        "| tp | device | startup s | "
        + " | ".join(f"decode B={b} ms" for b in results[min(results)]["decode_ms"])
        + " | (a) out tok/s | (a) total tok/s | (a) s |",
        "",
    ]
    lines[1] = "|" + "---|" * (lines[0].count("|") - 1)
    for tp, r in sorted(results.items()):
        w = r["workload_a"]
        dec = " | ".join(f"{v:.2f}" for v in r["decode_ms"].values())
        lines.append(
            f"| {tp} | {r['device']} | {r['startup_s']:.0f} | {dec} | "
            f"{w['output_tok_s']:.0f} | {w['total_tok_s']:.0f} | {w['seconds']:.1f} |"
        )
    if 1 in results and 2 in results:
        agree = agreement(results[1]["agreement_tokens"], results[2]["agreement_tokens"])
        a1, a2 = results[1]["workload_a"], results[2]["workload_a"]
        summary["agreement_tp2_vs_tp1"] = agree
        summary["scaling_workload_a"] = a2["output_tok_s"] / a1["output_tok_s"]
        summary["decode_speedup"] = {
            b: results[1]["decode_ms"][b] / results[2]["decode_ms"][b]
            for b in results[1]["decode_ms"]
        }
        lines += [
            "",
            f"Agreement tp=2 vs tp=1: {json.dumps(agree)}",
            f"Workload (a) scaling tp=2 / tp=1: {summary['scaling_workload_a']:.2f}x",
            f"Decode speedup per batch: {json.dumps(summary['decode_speedup'])}",
        ]
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "tp_gpu.json"), "w") as f:
        json.dump(summary, f, indent=2)
    with open(os.path.join(out_dir, "tp_gpu.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny model, 2 forced devices")
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2], help="tp sizes to run now")
    ap.add_argument("--work-dir", default="/tmp/jaxpaged_tp_gpu")
    ap.add_argument("--attention-backend", default=None, help="default: pallas on GPU")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.child is not None:
        return child(args.child, args.smoke, args.child_out, args.attention_backend)
    os.environ["NCCL_NVLS_ENABLE"] = "0"
    os.makedirs(args.work_dir, exist_ok=True)
    for tp in args.tp:
        _run_child(tp, args.smoke, args.work_dir, args.attention_backend)
    results = {}
    for tp in (1, 2):
        path = _child_path(args.work_dir, tp, args.smoke)
        if os.path.exists(path):
            with open(path) as f:
                results[tp] = json.load(f)
    report(results, args.out)


if __name__ == "__main__":
    main()
