"""End-to-end GPU benchmark (issue 6): jaxpaged vs HF transformers vs the roofline, one run.

    python benchmarks/e2e_gpu.py --out $OUT [--models llama3-8b,qwen3-0.6b] [--smoke]

Every part runs in its own subprocess (JAX and torch each preallocate GPU memory):
  ceilings   device copy bandwidth (bytes read + written) and bf16 matmul rate, via JAX
  jaxpaged   per model: cold start (fresh compilation cache), warm start (same cache),
             workloads (a) 256 x U[100,1024] in/out, (b) N x 128/128, (c) N x 1024/512,
             (d) single-stream decode at context 512 and 4096, (e) steady decode-step period at
             the plain-XLA baseline's (batch, context) points; per-step device-idle
             fraction; --sync-compare repeats (b) and (e) with synchronous scheduling
  xla        a plain unrolled-XLA decode step with a contiguous donated cache (baseline)
  hf         transformers generate, static batching, bf16, its own random weights
Roofline: floor per decode step = (weight bytes + KV bytes read) / measured copy bandwidth.
Results: $OUT/e2e.json and a markdown table printed last.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from benchmarks import e2e_report  # noqa: E402


# ---- parts (each runs in a fresh process) ----------------------------------------------
def part_ceilings(smoke: bool) -> dict:
    import jax
    import jax.numpy as jnp

    n = (1 << 20) if smoke else (1 << 30)  # 2 GiB of bf16
    x = jnp.ones((n,), jnp.bfloat16)
    f = jax.jit(lambda a: a * 2)
    _time(lambda: f(x), 3)
    copy_s = _time(lambda: f(x), 10)
    m = 512 if smoke else 8192
    a = jax.random.normal(jax.random.key(0), (m, m), jnp.bfloat16)
    mm = jax.jit(lambda p, q: p @ q)
    _time(lambda: mm(a, a), 3)
    mm_s = _time(lambda: mm(a, a), 10)
    return {
        "copy_GBps": 2 * n * 2 / copy_s / 1e9,
        "matmul_TFLOPs": 2 * m**3 / mm_s / 1e12,
        "device": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def _time(fn, iters: int) -> float:
    import jax

    jax.block_until_ready(fn())
    start = time.perf_counter()
    for _ in range(iters):
        out = fn()
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / iters


@contextlib.contextmanager
def _idle_probe(llm):
    """Record, per step, when the host began enqueueing it and when the device finished it (a
    waiter thread blocks on each step's fetched outputs in order, so the probe does not
    serialise async scheduling). The runner's step launcher is put back on exit."""
    import queue
    import threading

    import jax

    runner = llm.model_runner
    marks = []  # (dispatched, finished, bucket key, enqueued)
    pending: queue.Queue = queue.Queue()

    def wait():
        while (item := pending.get()) is not None:
            t0, fetched, key, t1 = item
            jax.block_until_ready(fetched)
            marks.append((t0, time.perf_counter(), key, t1))

    run_step = runner._run_step

    def probed(key, *args):
        t0 = time.perf_counter()
        fetched = run_step(key, *args)  # fresh arrays, never donated to a later step
        pending.put((t0, fetched, key, time.perf_counter()))
        return fetched

    waiter = threading.Thread(target=wait, daemon=True)
    waiter.start()
    runner._run_step = probed
    try:
        yield marks
    finally:
        del runner._run_step  # back to the method
        pending.put(None)
        waiter.join()


def _idle_fraction(marks, until_enqueued: bool = False) -> float:
    """Share of the wall time between the first and last step's end in which the device had
    finished a step and the host had not begun enqueueing the next (a host gap): a lower
    bound of the device's idle time, blind to a launch that began in time but ended late.
    until_enqueued: up to when the next step's calls returned instead, an upper bound (the
    device may start a step's first kernels before its last are enqueued)."""
    if len(marks) < 3:
        return float("nan")
    i = 3 if until_enqueued else 0
    gaps = sum(max(0.0, b[i] - a[1]) for a, b in zip(marks[:-1], marks[1:], strict=True))
    return gaps / (marks[-1][1] - marks[0][1])


DECODE_POINTS = {"B1_ctx512": (1, 512), "B1_ctx4096": (1, 4096), "B32_ctx1024": (32, 1024),
                 "B128_ctx512": (128, 512)}  # the plain-XLA baseline's points  # fmt: skip


def _decode_steps(llm, points: dict, num_out: int) -> dict:
    """Median period of steady decode-only steps (end to end, host gaps included) for B
    sequences of context ~ctx, plus the device-idle share over those steps."""
    import numpy as np

    from jaxpaged.sampling_params import SamplingParams

    vocab, res = llm.config.model.vocab_size, {}
    rng = np.random.default_rng(0)
    for name, (b, ctx) in points.items():
        prompts = [rng.integers(0, vocab, ctx - num_out // 2).tolist() for _ in range(b)]
        params = SamplingParams(temperature=0.0, max_tokens=num_out, ignore_eos=True)
        with _idle_probe(llm) as marks:
            llm.generate(prompts, params, use_tqdm=False)
        dec = [m for m in marks if m[2][2] and m[2][1] >= b]  # decode-only, whole batch
        ends = np.array([m[1] for m in dec[4:]])
        period = float(np.median(np.diff(ends))) if len(ends) > 2 else float("nan")
        res[name] = {
            "ms_per_step": period * 1e3,
            "tokens_per_s": b / period,
            "num_steps": len(dec),
            "device_idle_fraction": _idle_fraction(dec[4:]),
            "device_idle_upper": _idle_fraction(dec[4:], until_enqueued=True),
        }
    return res


def _set_async(llm, on: bool) -> None:
    assert not llm.engine._in_flight
    llm.engine.scheduler.async_scheduling = on


def part_jaxpaged(
    model: str,
    smoke: bool,
    cache_dir: str,
    workloads: list[str],
    sync_compare: bool = False,
    compare_depths: tuple[int, ...] = (),
    max_num_seqs: int | None = None,
    max_num_batched_tokens: int | None = None,
) -> dict:
    os.environ["JAXPAGED_COMPILATION_CACHE"] = cache_dir
    from jaxpaged import bench
    from jaxpaged.llm import LLM

    start = time.perf_counter()
    kw = dict(max_model_len=4608, max_num_seqs=max_num_seqs,
              max_num_batched_tokens=max_num_batched_tokens)  # fmt: skip
    if smoke:
        kw = dict(max_model_len=256, max_num_seqs=8, max_num_batched_tokens=64, num_kv_blocks=200)
        model = _tiny_config_dir(model)
    llm = LLM(model, load_format="dummy", **kw)
    sched = llm.config.scheduler  # the engine's defaults where the flags left them unset
    kw.update(max_num_seqs=sched.max_num_seqs, max_num_batched_tokens=sched.max_num_batched_tokens)
    res = {"startup_s": time.perf_counter() - start, "compile_s": llm.compile_seconds,
           "num_buckets": llm.model_runner.num_compiled, "engine_args": kw,
           "num_kv_blocks": llm.model_runner.num_blocks,
           "block_size": llm.config.cache.block_size,
           "compile_stats": llm.model_runner.compile_stats}  # fmt: skip
    scale = 0.02 if smoke else 1.0
    specs = {
        "a": dict(num_prompts=int(256 * scale) or 2, random_range=(100, 1024) if not smoke
                  else (10, 60), input_len=0, output_len=0),
        "b": dict(num_prompts=int(1000 * scale), input_len=128, output_len=128,
                  random_range=None),
        "c": dict(num_prompts=int(1000 * scale), input_len=1024 if not smoke else 64,
                  output_len=512 if not smoke else 32, random_range=None),
    }  # fmt: skip

    def throughput(name: str) -> dict:
        """bench's throughput run of workload `name`, with the device-idle share."""
        with _idle_probe(llm) as marks:
            out = bench.run_throughput(llm, argparse.Namespace(seed=0, **specs[name]))
        out["device_idle_fraction"] = _idle_fraction(marks)
        out["device_idle_upper"] = _idle_fraction(marks, until_enqueued=True)
        return out

    for name in workloads:
        if name in specs:
            res[name] = throughput(name)
    if "d" in workloads:
        for ctx in (512, 4096) if not smoke else (64,):
            args = argparse.Namespace(batch_size=1, input_len=ctx, output_len=64 if smoke else 256,
                                      num_iters=2, seed=0)  # fmt: skip
            res[f"d_ctx{ctx}"] = bench.run_latency(llm, args)
    points = {"B1_ctx64": (1, 64), "B4_ctx64": (4, 64)} if smoke else DECODE_POINTS
    if "e" in workloads:
        res["decode_steps"] = _decode_steps(llm, points, 16 if smoke else 64)
    if sync_compare:  # the same engine with synchronous scheduling, for the async gain
        _set_async(llm, False)
        sync = res["sync"] = {"decode_steps": _decode_steps(llm, points, 16 if smoke else 64)}
        if "b" in workloads:
            sync["b"] = throughput("b")
        _set_async(llm, True)
    res["async_depth"] = default_depth = llm.engine.async_depth
    for depth in compare_depths:  # the same engine at other async depths
        assert not llm.engine._in_flight
        llm.engine.async_depth = depth
        other = res[f"async_depth_{depth}"] = {}
        if "b" in workloads:
            other["b"] = throughput("b")
        if "e" in workloads:
            other["decode_steps"] = _decode_steps(llm, points, 16 if smoke else 64)
        llm.engine.async_depth = default_depth
    leaves = __import__("jax").tree.leaves(llm.model_runner.params)
    res["weight_bytes"] = sum(x.nbytes for x in leaves)
    c = llm.config.model
    # For the throughput workloads' compute bound: every token passes the layers (2 FLOP per
    # parameter), and each output token's row also passes the lm_head.
    head = c.vocab_size * c.hidden_size
    embeds = head if c.tie_word_embeddings else 2 * head
    res["layer_params"] = sum(x.size for x in leaves) - embeds
    res["lm_head_params"] = head
    # A step gathers rows of an untied input embedding table; it reads all other weights.
    table = llm.model_runner.params["embed"]["embedding"]
    unread = 0 if c.tie_word_embeddings else table.nbytes
    res["step_weight_bytes"] = res["weight_bytes"] - unread
    res["kv_bytes_per_token"] = 2 * c.num_layers * c.num_kv_heads * c.head_dim * 2
    return res


TINY = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=512)  # fmt: skip


def _tiny_config_dir(model: str) -> str:
    """A config.json of `model`'s family at toy size, for --smoke runs on CPU."""
    from jaxpaged.models.loader import PRESETS

    path = tempfile.mkdtemp(prefix="tiny-")
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(dict(PRESETS[model], **TINY), f)
    return path


# HF's static-batching runs: (name, input len, output len), each one batch of 128 sequences.
HF_THROUGHPUT = [("b_batch128", 128, 128), ("c_batch128", 1024, 512)]
HF_PAD_TOKEN = 0  # generate() needs a pad id when no EOS is set; prompts never hold it


def hf_inputs(vocab_size: int, batch: int, n_in: int, seed: int, pad_in_prompt: bool = False):
    """HF generate's inputs for one static batch: random prompt ids and, as a tokenizer gives
    for prompts of equal length, an all-ones attention mask. generate() infers a mask from the
    ids wherever it is given none and a prompt holds the pad id, which sends every attention
    call down SDPA's masked path; before 2026-12-03 the baseline passed no mask and drew ids
    that held the pad id at random, so HF ran slower on some runs (side by side on the Qwen3
    shape: 2.9x on (c), 1.1x on (b); docs/benchmarks.md).
    pad_in_prompt: that condition on purpose, one pad id and no mask (mask None)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(HF_PAD_TOKEN + 1, vocab_size, (batch, n_in), generator=gen)
    if pad_in_prompt:
        ids[0, n_in // 2] = HF_PAD_TOKEN
        return ids, None
    return ids, torch.ones_like(ids)


def part_hf(model: str, smoke: bool, cases: list[str], inferred_mask: tuple[str, ...] = ()) -> dict:
    """HF generate at static batch 128 on the throughput workloads in `cases` and batch 1 at
    context 512; each timed run follows an untimed one of the same inputs. inferred_mask:
    those workloads' letters again with a pad id in the prompts and no mask (the old, slow
    baseline), as `<name>_inferred_mask`."""
    import torch
    import transformers as tf

    from jaxpaged.models.loader import PRESETS

    cfg = dict(PRESETS[model])
    cfg.pop("model_type", None)
    cls = tf.Qwen3Config if model.startswith("qwen3") else tf.LlamaConfig
    if smoke:
        cfg.update(TINY)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        hf = tf.AutoModelForCausalLM.from_config(cls(**cfg), dtype=torch.bfloat16).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = HF_PAD_TOKEN
    res = {}
    runs = [(name, 128, n_in, n_out, False) for name, n_in, n_out in HF_THROUGHPUT
            if name in cases]  # fmt: skip
    runs += [(f"{name}_inferred_mask", b, n_in, n_out, True)
             for name, b, n_in, n_out, _ in runs if name[0] in inferred_mask]  # fmt: skip
    runs.append(("d_ctx512", 1, 512, 128, False))
    if smoke:
        runs = [(name, 4, 16, 8, pad) for name, _, _, _, pad in runs]
    for name, batch, n_in, n_out, pad in runs:
        seed = "bcd".index(name[0])  # a workload's two cases share their prompts
        ids, mask = hf_inputs(cfg["vocab_size"], batch, n_in, seed, pad_in_prompt=pad)
        ids, mask = ids.to(device), mask if mask is None else mask.to(device)
        gen = dict(max_new_tokens=n_out, min_new_tokens=n_out, do_sample=False)
        with torch.no_grad():
            hf.generate(ids, attention_mask=mask, **gen)  # warm-up: the allocator grows
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            hf.generate(ids, attention_mask=mask, **gen)
            if device == "cuda":
                torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        res[name] = {"output_tokens_per_s": batch * n_out / elapsed, "elapsed_s": elapsed,
                     "attention_mask": "inferred" if pad else "ones"}  # fmt: skip
    return res


def part_xla(model: str, smoke: bool) -> dict:
    from benchmarks.xla_decode_baseline import measure

    return measure(model, smoke)


PARTS = {"ceilings": part_ceilings, "jaxpaged": part_jaxpaged, "hf": part_hf, "xla": part_xla}


def _spawn(part: str, payload: dict) -> dict:
    cmd = [sys.executable, __file__, "--part", part, "--payload", json.dumps(payload)]
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3000)
    sys.stderr.write(proc.stderr[-3000:])
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"error": f"exit {proc.returncode}: {proc.stderr[-800:]}"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", default=None)
    ap.add_argument("--payload", default="{}")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--models", default="qwen3-0.6b,llama3-8b")
    ap.add_argument("--workloads", default="a,b,c,d,e")
    ap.add_argument(
        "--sync-compare",
        action="store_true",
        help="also time decode steps and (b) with synchronous scheduling",
    )
    ap.add_argument(
        "--compare-depths",
        default="",
        help="comma list of async depths to run (b) and the decode steps at as well",
    )
    ap.add_argument("--max-num-seqs", type=int, default=None, help="default: the engine's")
    ap.add_argument(
        "--max-num-batched-tokens", type=int, default=None, help="default: the engine's"
    )
    ap.add_argument(
        "--skip", default="", help="comma list of parts to skip (jaxpaged, warm, xla, hf)"
    )
    ap.add_argument(
        "--hf-inferred-mask",
        default="",
        help="comma list of throughput workloads (b, c) HF also runs with a pad id in the "
        "prompts and no attention mask (the slow path the baseline took before 2026-12-03)",
    )
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, runs on CPU")
    args = ap.parse_args()
    if args.part:
        print("RESULT " + json.dumps(PARTS[args.part](**json.loads(args.payload))))
        return
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    skip = set(args.skip.split(","))
    command = "PYTHONPATH=. python3 benchmarks/e2e_gpu.py " + " ".join(sys.argv[1:])
    results = {"ceilings": _spawn("ceilings", {"smoke": args.smoke}), "models": {},
               "command": command.replace(args.out, "$OUT")}  # fmt: skip
    print("ceilings", results["ceilings"], flush=True)
    wanted = args.workloads.split(",")
    depths = [int(d) for d in filter(None, args.compare_depths.split(","))]
    hf_cases = [name for name, _, _ in HF_THROUGHPUT if name[0] in wanted]
    for model in args.models.split(","):
        cache = tempfile.mkdtemp(prefix="xla-cache-")
        r = results["models"][model] = {}
        payload = {"model": model, "smoke": args.smoke, "cache_dir": cache,
                   "workloads": wanted, "max_num_seqs": args.max_num_seqs,
                   "max_num_batched_tokens": args.max_num_batched_tokens}  # fmt: skip
        hf_payload = {"model": model, "smoke": args.smoke, "cases": hf_cases,
                      "inferred_mask": args.hf_inferred_mask.split(",")}  # fmt: skip
        parts = [
            (
                "jaxpaged",
                "jaxpaged",
                dict(payload, sync_compare=args.sync_compare, compare_depths=depths),
            ),
            ("jaxpaged_warm", "jaxpaged", dict(payload, workloads=[])),  # same cache dir
            ("hf", "hf", hf_payload),
            ("xla", "xla", {"model": model, "smoke": args.smoke}),
        ]
        for name, part, part_payload in parts:
            if name.removeprefix("jaxpaged_") in skip:
                continue
            start = time.perf_counter()
            r[name] = _spawn(part, part_payload)
            print(f"{model} {name} ({time.perf_counter() - start:.0f} s):", r[name], flush=True)
            with open(os.path.join(args.out, "e2e.json"), "w") as f:  # after every part
                json.dump(results, f, indent=2)
    print(e2e_report.table(results))
    try:
        written = e2e_report.render(results, args.out)
        print("report:", ", ".join(written))
    except ImportError as e:  # no matplotlib: render later with benchmarks/e2e_report.py
        print(f"no charts ({e}); run benchmarks/e2e_report.py on e2e.json")


if __name__ == "__main__":
    main()
