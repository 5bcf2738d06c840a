"""Subprocess body for the sharding tests: greedy tokens of one model at several tp sizes.

    python -m tests.sharding.tp_worker MODEL_DIR OUT_JSON --tp 1 2 4 8
        [--coordinator HOST:PORT --num-processes N --process-id I [--mirror]]

Run with XLA_FLAGS=--xla_force_host_platform_device_count=N and JAX_PLATFORMS=cpu (the
pytest process has already initialised JAX with one device). Writes, per tp: the token ids
of every prompt, and what each device holds of a kv-sharded param and of the KV pool.
"""

from __future__ import annotations

import argparse
import json
import logging

PROMPTS = [[1, 5, 9, 200, 17], [3] * 21, list(range(40, 90)), [250, 7, 7, 31]]
MAX_TOKENS = 12


def _shard_facts(llm) -> dict:
    """Shapes held per device of one layer's qkv kernel and K cache, and the full shapes."""
    params = llm.model_runner.params
    qkv = params["layers_0"]["attn"]["qkv"]["kernel"]
    k_cache = llm.model_runner.kv_caches[0][0]
    return {
        "qkv_shape": list(qkv.shape),
        "qkv_shards": [list(s.data.shape) for s in qkv.addressable_shards],
        "cache_shape": list(k_cache.shape),
        "cache_shards": [list(s.data.shape) for s in k_cache.addressable_shards],
        "embed_shards": [
            list(s.data.shape) for s in params["embed"]["embedding"].addressable_shards
        ],
        "num_devices": len(qkv.sharding.device_set),
    }


def run(model: str, tp: int, dist: dict, mirror: bool = False) -> dict:
    from jaxpaged.llm import LLM
    from jaxpaged.sampling_params import SamplingParams

    llm = LLM(model, dtype="float32", max_model_len=128, max_num_seqs=4,
              max_num_batched_tokens=32, num_kv_blocks=48, show_progress=False,
              tensor_parallel_size=tp, **dist)  # fmt: skip
    sp = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    pool = llm.model_runner.kv_caches[0][0]
    addrs = [s.data.unsafe_buffer_pointer() for s in pool.addressable_shards]
    outs = llm.generate(PROMPTS, sp, use_tqdm=False)
    new_pool = llm.model_runner.kv_caches[0][0]
    # Donation kept the pool in place: old buffers deleted, new ones at the same addresses.
    in_place = pool.is_deleted() and addrs == [
        s.data.unsafe_buffer_pointer() for s in new_pool.addressable_shards
    ]
    result = {"tokens": [list(o.outputs[0].token_ids) for o in outs], **_shard_facts(llm)}
    result["pool_in_place"] = in_place
    if dist and mirror:
        result["mirrored_tokens"] = _mirrored(llm, sp)
    return result


def _mirrored(llm, sp) -> list[list[int]] | None:
    """As `serve` runs across processes: process 0 alone takes requests and schedules,
    the others replay its steps (runner/multihost.py)."""
    import jax

    from jaxpaged.runner.multihost import MirroredRunner, follow

    if jax.process_index() != 0:
        follow(llm.model_runner)
        return None
    runner = MirroredRunner(llm.model_runner)
    llm.engine.model_runner = runner
    try:
        outs = llm.generate(PROMPTS, sp, use_tqdm=False)
    finally:
        runner.stop()
    return [list(o.outputs[0].token_ids) for o in outs]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("out")
    p.add_argument("--tp", type=int, nargs="+", required=True)
    p.add_argument("--coordinator", default=None)
    p.add_argument("--num-processes", type=int, default=1)
    p.add_argument("--process-id", type=int, default=0)
    p.add_argument("--mirror", action="store_true", help="also run leader/follower steps")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    dist = {}
    if args.coordinator:
        dist = dict(distributed_coordinator=args.coordinator,
                    num_processes=args.num_processes, process_id=args.process_id)  # fmt: skip
    results = {}
    for i, tp in enumerate(args.tp):
        # jax.distributed.initialize runs once per process.
        results[str(tp)] = run(args.model, tp, dist if i == 0 else {}, args.mirror)
    with open(args.out, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
