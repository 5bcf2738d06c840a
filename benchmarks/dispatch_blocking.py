"""Which part of the engine step makes its executable call wait for the device?

    PYTHONPATH=. python benchmarks/dispatch_blocking.py [--smoke]

One child process per variant, each an 8-layer Llama-3-8B-shape engine (dummy weights),
one greedy stream of 64 tokens, async scheduling: the mean time the step's executable calls
(staging, forward, sampler, copy: `ModelRunner._run_step`) take to return, against the wall
time per token. Variants: the Pallas backend, the
reference backend, the Pallas backend with the sampler's lax.cond replaced by selects,
without XLA command buffers (CUDA graphs), without the early device-to-host copies of the
sampled ids, and without donating the KV pool and sampler state.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

VARIANTS = {  # name -> XLA_FLAGS
    "pallas": "",
    "reference": "",
    "pallas_no_cond": "",
    "pallas_cmdbuf_off": "--xla_gpu_enable_command_buffer=",
    "pallas_no_host_copy": "",
    "pallas_no_donation": "",
    # XLA:GPU launches every kernel of the step from the host inside the call; CUDA graphs
    # (command buffers) launch recorded sequences at once.
    "pallas_cmdbuf_min1": "--xla_gpu_graph_min_graph_size=1",
    "pallas_cmdbuf_all_min1": "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,"
    "CUSTOM_CALL,CONDITIONAL,WHILE --xla_gpu_graph_min_graph_size=1",
}


def _select_cond(pred, true_fn, false_fn, *operands):
    import jax
    import jax.numpy as jnp

    a, b = true_fn(*operands), false_fn(*operands)
    return jax.tree.map(lambda x, y: jnp.where(pred, x, y), a, b)


def child(variant: str, smoke: bool) -> dict:
    import jax

    if variant.endswith("no_cond"):
        jax.lax.cond = _select_cond
    if variant.endswith("no_host_copy"):
        from jax._src import array

        array.ArrayImpl.copy_to_host_async = lambda self: None
    if variant.endswith("no_donation"):
        jit = jax.jit

        def jit_without_donation(fn, **kw):
            kw.pop("donate_argnames", None)
            kw.pop("donate_argnums", None)
            return jit(fn, **kw)

        jax.jit = jit_without_donation
    backend = "reference" if variant == "reference" else "pallas"
    return one_stream(small_8b_engine(8, smoke, attention_backend=backend))


def small_8b_engine(layers: int, smoke: bool, **llm_kw):
    """An LLM of the Llama-3-8B shape cut to `layers` layers (dummy weights, bf16, 4 seqs)."""
    from jaxpaged.llm import LLM
    from jaxpaged.models.loader import PRESETS

    cfg = dict(PRESETS["llama3-8b"], num_hidden_layers=layers)
    if smoke:
        cfg.update(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, vocab_size=512)  # fmt: skip
    path = tempfile.mkdtemp()
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    return LLM(path, load_format="dummy", show_progress=False, dtype="bfloat16",
               max_model_len=1024, max_num_seqs=4, max_num_batched_tokens=64,
               num_kv_blocks=256 if smoke else None, **llm_kw)  # fmt: skip


def one_stream(llm, before_timed=None) -> dict:
    """One greedy stream of 64 tokens after a warm-up stream: the mean time the step's
    executable call takes to return (steps 8 on) and the wall time per token."""
    from jaxpaged.sampling_params import SamplingParams

    runner = llm.model_runner
    calls = []

    def wrap(exe):
        def call(*args):
            t0 = time.perf_counter()
            out = exe(*args)
            calls.append(time.perf_counter() - t0)
            return out

        return call

    params = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    first = llm.generate([[1] * 100], params, use_tqdm=False)
    runner._run_step = wrap(runner._run_step)  # the step's calls: stage, forward, sampler
    if before_timed is not None:
        before_timed()
    t0 = time.perf_counter()
    again = llm.generate([[1] * 100], params, use_tqdm=False)
    wall = time.perf_counter() - t0
    calls = calls[8:]
    return {
        "call_return_ms": 1e3 * sum(calls) / len(calls),
        "wall_per_token_ms": wall / 64e-3,
        "same_tokens_twice": first[0].outputs[0].token_ids == again[0].outputs[0].token_ids,
        "first_tokens": list(first[0].outputs[0].token_ids[:8]),
    }


def main() -> None:
    if "--child" in sys.argv:
        variant = sys.argv[sys.argv.index("--child") + 1]
        print("RESULT " + json.dumps(child(variant, "--smoke" in sys.argv)))
        return
    results = {}
    only = os.environ.get("VARIANTS")
    for variant, flags in VARIANTS.items():
        if only and variant not in only.split(","):
            continue
        cmd = [sys.executable, __file__, "--child", variant] + sys.argv[1:]
        env = dict(os.environ, XLA_FLAGS=flags)
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        results[variant] = json.loads(line[0][7:]) if line else {"error": proc.stderr[-800:]}
        print(variant, json.dumps(results[variant]), flush=True)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "dispatch_blocking.json"), "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
