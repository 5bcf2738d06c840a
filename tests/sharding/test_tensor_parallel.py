"""Tensor parallelism on CPU: 8 forced host devices in a subprocess (this pytest process
already initialised JAX with one device), and 2 processes joined by jax.distributed.

Greedy tokens at tp = 2, 4, 8 must equal tp = 1 exactly: float32 weights with std 0.08 give
logit margins far above the ~1e-6 that a different all-reduce order can move them.
Two models: 8 heads / 8 kv heads (tp divides the kv heads; loaded from HF safetensors) and
8 heads / 2 kv heads (tp 4 and 8 replicate kv heads; loaded from a converted orbax dir).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import transformers as tf

from jaxpaged.config import ModelConfig
from jaxpaged.sharding import LOGICAL_AXIS_RULES, plan_tp

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _hf_model(path: str, heads: int, kv_heads: int) -> str:
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                            num_hidden_layers=2, num_attention_heads=heads,
                            num_key_value_heads=kv_heads, head_dim=16,
                            max_position_embeddings=256)  # fmt: skip
    model = tf.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.08)
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from converters.convert import convert

    root = tmp_path_factory.mktemp("tp-models")
    even = _hf_model(str(root / "h8k8"), 8, 8)
    hf_rep = _hf_model(str(root / "h8k2-hf"), 8, 2)
    rep = str(root / "h8k2")
    convert(hf_rep, rep, dtype="float32")
    return {"even": even, "replicated": rep}


def _worker(model: str, out: str, tps, devices: int, extra=()) -> subprocess.Popen:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")  # fmt: skip
    cmd = [sys.executable, "-m", "tests.sharding.tp_worker", model, out, "--tp"]
    cmd += [str(t) for t in tps] + list(extra)
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip


def _wait(proc: subprocess.Popen, out: str, timeout: float = 400) -> dict:
    log, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, log[-4000:]
    with open(out) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def results(models, tmp_path_factory):
    """Both models' tp sweeps, run side by side (two subprocesses, 8 devices each)."""
    tmp = tmp_path_factory.mktemp("tp-out")
    sweeps = {"even": (1, 2, 4, 8), "replicated": (1, 4, 8)}
    procs = {
        name: (_worker(models[name], str(tmp / f"{name}.json"), tps, 8), str(tmp / f"{name}.json"))
        for name, tps in sweeps.items()
    }
    return {name: _wait(*pair) for name, pair in procs.items()}


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_even_kv_heads_token_identical(results, tp):
    r = results["even"]
    assert r[str(tp)]["tokens"] == r["1"]["tokens"]


@pytest.mark.parametrize("tp", [4, 8])
def test_replicated_kv_heads_token_identical(results, tp):
    r = results["replicated"]
    assert r[str(tp)]["tokens"] == r["1"]["tokens"]


def test_tokens_are_not_degenerate(results):
    """Guard against a vacuous pass: the prompts' continuations differ from each other."""
    tokens = results["even"]["1"]["tokens"]
    assert len({tuple(t) for t in tokens}) == len(tokens)
    assert all(len(t) == 12 for t in tokens)


@pytest.mark.parametrize("tp", [2, 8])
def test_params_and_kv_pool_split_over_devices(results, tp):
    """Each device holds 1/tp of the kv-head axis of qkv and of the KV pool, and 1/tp of
    the vocab of the embedding ([E, K, G+2, D] qkv, [N, bs, K, D] cache); the donated
    pool is updated in place."""
    r = results["even"][str(tp)]
    assert r["num_devices"] == tp
    assert r["qkv_shape"] == [64, 8, 3, 16]
    assert r["qkv_shards"] == [[64, 8 // tp, 3, 16]] * tp
    assert r["cache_shape"][2] == 8
    assert r["cache_shards"] == [[48, 16, 8 // tp, 16]] * tp
    assert r["embed_shards"] == [[256 // tp, 64]] * tp
    assert r["pool_in_place"]


def test_single_device_path_has_no_mesh(results):
    r = results["even"]["1"]
    assert r["num_devices"] == 1 and r["qkv_shards"] == [r["qkv_shape"]]


def test_replication_regroups_heads(results):
    """8 heads / 2 kv heads at tp 8: K' = 8 kv heads of G' = 1 query head each, one per
    device; at tp 1 the checkpoint's grouping is kept."""
    r = results["replicated"]
    assert r["1"]["qkv_shape"] == [64, 2, 6, 16]
    assert r["8"]["qkv_shape"] == [64, 8, 3, 16]
    assert r["8"]["qkv_shards"] == [[64, 1, 3, 16]] * 8
    assert r["4"]["cache_shards"] == [[48, 16, 1, 16]] * 4


def _config(**kw) -> ModelConfig:
    base = dict(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128,
                num_layers=2, num_heads=8, num_kv_heads=2, head_dim=16)  # fmt: skip
    return ModelConfig(**{**base, **kw})


def test_plan_rejects_heads_not_divisible():
    with pytest.raises(ValueError, match="num_attention_heads \\(8\\) must be divisible"):
        plan_tp(_config(), 3)
    with pytest.raises(ValueError, match="intermediate_size \\(100\\)"):
        plan_tp(_config(intermediate_size=100), 8)


def test_plan_replication_factor_and_vocab_fallback():
    assert plan_tp(_config(), 2).kv_replication == 1
    plan = plan_tp(_config(num_heads=12, num_kv_heads=4, intermediate_size=192, vocab_size=264), 6)
    assert (plan.kv_replication, plan.config.num_kv_heads, plan.config.q_per_kv) == (3, 12, 1)
    assert plan.rules == LOGICAL_AXIS_RULES
    odd = plan_tp(_config(vocab_size=255), 2)
    assert dict(odd.rules)["vocab"] is None and dict(odd.rules)["kv_heads"] == "tp"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_form_one_mesh(models, results, tmp_path):
    """2 CPU processes x 2 devices on loopback = one tp=4 mesh; the tokens equal those of
    one process at tp = 1 (replicated model: kv heads are regrouped across processes),
    both when every process runs generate() and when process 0 alone schedules and
    process 1 replays its steps (how `serve` runs across processes)."""
    address = f"127.0.0.1:{_free_port()}"
    procs = []
    for i in range(2):
        out = str(tmp_path / f"proc{i}.json")
        extra = ["--coordinator", address, "--num-processes", "2", "--process-id", str(i)]
        extra.append("--mirror")
        procs.append((_worker(models["replicated"], out, [4], 2, extra), out))
    got = [_wait(*p) for p in procs]
    want = results["replicated"]["1"]["tokens"]
    for r in got:
        assert r["4"]["num_devices"] == 4
        assert len(r["4"]["qkv_shards"]) == 2  # each process addresses its own 2 devices
        assert r["4"]["tokens"] == want
    assert got[0]["4"]["mirrored_tokens"] == want
    assert got[1]["4"]["mirrored_tokens"] is None  # the follower only replayed steps
    print(f"\n2 processes x 2 CPU devices, tp=4: {len(want)} prompts, tokens of prompt 0 "
          f"{got[0]['4']['tokens'][0]} == tp=1 in one process; process 0 scheduling alone "
          f"with process 1 replaying: identical")  # fmt: skip


def test_replicate_kv_heads_regroups_exactly():
    """In-process (one device): K=2 -> K'=8 at tp 8. New kv head k' = k * r + j gets the
    original group k's query heads j*G' .. (j+1)*G' - 1 and a copy of k's K and V."""
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from jaxpaged.sharding import replicate_kv_heads

    plan = plan_tp(_config(), 8)  # 8 heads, 2 kv heads: r = 4, G' = 1
    rep = NamedSharding(Mesh(np.array(jax.devices()[:1]), ("tp",)), P())
    e, k, g, d = 64, 2, 4, 16
    qkv = np.random.default_rng(0).standard_normal((e, k, g + 2, d)).astype(np.float32)
    o = np.random.default_rng(1).standard_normal((k, g, d, e)).astype(np.float32)
    params = {"layers_0": {"attn": {"qkv": {"kernel": jax.device_put(qkv)},
                                    "o": {"kernel": jax.device_put(o)}}}}  # fmt: skip
    shardings = jax.tree.map(lambda _: rep, params)
    out = replicate_kv_heads(params, plan, shardings)["layers_0"]["attn"]
    new_qkv, new_o = np.asarray(out["qkv"]["kernel"]), np.asarray(out["o"]["kernel"])
    assert new_qkv.shape == (e, 8, 3, d) and new_o.shape == (8, 1, d, e)
    for kk in range(k):
        for j in range(4):
            np.testing.assert_array_equal(new_qkv[:, kk * 4 + j, 0], qkv[:, kk, j])
            np.testing.assert_array_equal(new_qkv[:, kk * 4 + j, 1:], qkv[:, kk, g:])
            np.testing.assert_array_equal(new_o[kk * 4 + j, 0], o[kk, j])
