"""Tensor parallelism: one mesh axis "tp", one rules table, the KV pool split by kv heads.

    tensor_parallel_size ─► make_mesh ─► Mesh(devices[:tp], ("tp",))
    ModelConfig ─► plan_tp ─► TPPlan (kv-head replication factor, the config the model runs)
    abstract params (logical axes) ─► LOGICAL_AXIS_RULES ─► NamedSharding per leaf
    load at the checkpoint's shapes ─► replicate_kv_heads (on device, leaf by leaf)
    backend ─► shard_attention ─► the same backend run per device under jax.shard_map

Megatron layout through GSPMD: q/k/v and gate/up are column-parallel (their kv-head / MLP
axis is split), o and down are row-parallel (XLA adds one all-reduce after each), embedding
and lm_head are vocab-parallel. Activations between layers stay replicated. Attention runs
under shard_map so a Pallas kernel sees only its device's heads: q split over query heads,
k/v and the caches over kv heads, metadata replicated.

kv-head replication: when tp does not divide K kv heads (e.g. K=2, tp=8), every kv head is
copied r = lcm(K, tp) / K times at load time. The model then runs with K' = K * r kv heads
and G' = G / r query heads per kv head; query head h keeps its index (h = k'G' + g'), so
only the grouping changes and the outputs are the same. The KV pool holds K' heads, i.e.
each device stores the heads it needs and the pool as a whole stores r copies.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxpaged.config import ModelConfig

logger = logging.getLogger(__name__)

TP = "tp"

LOGICAL_AXIS_RULES: tuple[tuple[str, str | None], ...] = (
    ("vocab", TP),  # vocab-parallel embedding and lm_head
    ("kv_heads", TP),  # whole kv groups: q/k/v column-parallel, o row-parallel
    ("mlp", TP),  # gate/up column-parallel, down row-parallel
    ("embed", None),
    ("qkv", None),
    ("q_per_kv", None),
    ("head_dim", None),
    ("gate_up", None),
    ("norm", None),
)


# ---- processes, mesh and plan -----------------------------------------------------------
def init_distributed(coordinator: str, num_processes: int, process_id: int) -> None:
    """Join JAX's multi-controller runtime; must run before anything touches devices.
    Every process then runs the same program on its share of one global mesh."""
    if not 0 <= process_id < num_processes:
        raise ValueError(f"process_id={process_id} must be in [0, num_processes={num_processes}).")
    # CPU processes need a collectives library to talk (GPUs use NCCL whatever this says).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator, num_processes=num_processes, process_id=process_id
    )
    logger.info("process %d of %d joined %s", process_id, num_processes, coordinator)


def make_mesh(tensor_parallel_size: int) -> Mesh:
    """A 1-D "tp" mesh over the first tp devices (all processes' devices when distributed)."""
    n = jax.device_count()
    if not 1 <= tensor_parallel_size <= n:
        raise ValueError(f"tensor_parallel_size={tensor_parallel_size}, but {n} devices exist.")
    if jax.process_count() > 1 and tensor_parallel_size != n:
        # Every process must own part of the mesh, or it would have nothing to run.
        raise ValueError(
            f"With {jax.process_count()} processes tensor_parallel_size must equal the "
            f"global device count {n}, got {tensor_parallel_size}."
        )
    return Mesh(np.array(jax.devices()[:tensor_parallel_size]), (TP,))


@dataclasses.dataclass(frozen=True)
class TPPlan:
    tp: int
    kv_replication: int
    """r: copies of each checkpoint kv head (1 when tp divides num_kv_heads)."""
    config: ModelConfig
    """The config the model runs with: num_kv_heads = checkpoint K * r."""
    rules: tuple[tuple[str, str | None], ...]
    """LOGICAL_AXIS_RULES, with vocab replicated when tp does not divide it."""


def plan_tp(config: ModelConfig, tp: int) -> TPPlan:
    """Validate that `config` splits over `tp` devices; choose kv-head replication."""
    h, k, f, v = config.num_heads, config.num_kv_heads, config.intermediate_size, config.vocab_size
    if h % tp:
        raise ValueError(
            f"num_attention_heads ({h}) must be divisible by tensor_parallel_size={tp}."
        )
    if f % tp:
        raise ValueError(f"intermediate_size ({f}) must be divisible by tensor_parallel_size={tp}.")
    # Both k and tp divide h, so their lcm does: every device gets whole kv groups.
    k_run = math.lcm(k, tp)
    rules = LOGICAL_AXIS_RULES
    if v % tp:
        # Padding the vocab would change logits' shape everywhere; a replicated embedding
        # costs memory, not correctness.
        logger.warning("vocab_size %d is not divisible by tp=%d: vocab is replicated.", v, tp)
        rules = tuple((name, None if name == "vocab" else axis) for name, axis in rules)
    run_config = dataclasses.replace(config, num_kv_heads=k_run)
    return TPPlan(tp, k_run // k, run_config, rules)


# ---- shardings ---------------------------------------------------------------------------
def _kv_head_axis(backend) -> int:
    """Which axis of the backend's cache layout is the kv-head axis (probed with primes)."""
    shape = backend.kv_cache_shape(2, 3, 5, 7)
    if shape.count(5) != 1:
        raise ValueError(f"Backend {backend.name!r} has no single kv-head axis in {shape}.")
    return shape.index(5)


def kv_cache_spec(backend) -> P:
    axes = [None] * len(backend.kv_cache_shape(2, 3, 5, 7))
    axes[_kv_head_axis(backend)] = TP
    return P(*axes)


def param_shardings(model, mesh: Mesh, rules) -> dict:
    """Nested dict of NamedShardings matching the params of `model` (a LlamaForCausalLM)."""
    from jaxpaged.models.llama import abstract_params

    specs = nn.get_partition_spec(abstract_params(model))
    return _plain(nn.logical_to_mesh_sharding(specs, mesh, rules))


def _plain(tree):
    return {k: _plain(v) for k, v in tree.items()} if hasattr(tree, "items") else tree


@dataclasses.dataclass(frozen=True)
class MeshShardings:
    """What the runner needs: where the KV pool, the step inputs and the params live."""

    mesh: Mesh
    kv_cache: NamedSharding
    """Each per-layer K or V array: split over kv heads."""
    replicated: NamedSharding
    """Step inputs, sampler state and sampled outputs."""
    params: dict
    """Nested dict of NamedShardings with the param tree's structure."""

    def put_replicated(self, tree):
        """Host pytree -> replicated arrays. Across processes each one builds its own
        shards from its own (identical) copy: no collective, unlike jax.device_put."""
        if self.replicated.is_fully_addressable:
            return jax.device_put(tree, self.replicated)

        def put(x):
            x = np.asarray(x)
            return jax.make_array_from_callback(x.shape, self.replicated, lambda i: x[i])

        return jax.tree.map(put, tree)


def make_shardings(model, mesh: Mesh, plan: TPPlan) -> MeshShardings:
    return MeshShardings(
        mesh=mesh,
        kv_cache=NamedSharding(mesh, kv_cache_spec(model.backend)),
        replicated=NamedSharding(mesh, P()),
        params=param_shardings(model, mesh, plan.rules),
    )


# ---- kv-head replication -----------------------------------------------------------------
_REGROUPED = ("qkv", "o")


def load_shardings(shardings: dict, plan: TPPlan) -> dict:
    """Shardings for the checkpoint's shapes: the leaves that replication regroups are
    split over their embed axis instead (their kv-head axis does not divide by tp), so the
    loaded model stays split. Regrouping then gathers one leaf at a time (XLA warns of a
    "full rematerialization"): a transient copy of one layer's qkv or o, once, at start-up."""
    if plan.kv_replication == 1:
        return shardings
    mesh = jax.tree.leaves(shardings)[0].mesh
    e_split = plan.config.hidden_size % plan.tp == 0

    def spec(path: tuple[str, ...]) -> NamedSharding:
        if not e_split or path[-1] == "bias":
            return NamedSharding(mesh, P())
        return NamedSharding(mesh, P(TP) if path[-2] == "qkv" else P(None, None, None, TP))

    return _map_regrouped(shardings, lambda path, s: spec(path))


def _map_regrouped(tree: dict, fn, path=()) -> dict:
    out = {}
    for key, value in tree.items():
        sub = path + (key,)
        if isinstance(value, dict):
            out[key] = _map_regrouped(value, fn, sub)
        else:
            out[key] = fn(sub, value) if len(sub) >= 2 and sub[-2] in _REGROUPED else value
    return out


def replicate_kv_heads(params: dict, plan: TPPlan, shardings: dict) -> dict:
    """Checkpoint params (K kv heads) -> the run config's (K * r), leaf by leaf on device."""
    if plan.kv_replication == 1:
        return params
    r, g_run = plan.kv_replication, plan.config.q_per_kv
    flat_s = {}
    _map_regrouped(shardings, lambda path, s: flat_s.setdefault(path, s))

    def regroup(path, x):
        y = _regroup_fn(path[-2], r, g_run, flat_s[path])(x)
        x.delete()  # one leaf's two copies at a time, never the whole model's
        return y

    return _map_regrouped(params, regroup)


@functools.cache
def _regroup_fn(kind: str, r: int, g_run: int, sharding):
    def qkv(w):  # [..., K, G+2, D] -> [..., K*r, G/r + 2, D]
        *lead, k, _, d = w.shape
        q = w[..., :-2, :].reshape(*lead, k, r, g_run, d)
        kv = jnp.broadcast_to(w[..., None, -2:, :], (*lead, k, r, 2, d))
        return jnp.concatenate([q, kv], axis=-2).reshape(*lead, k * r, g_run + 2, d)

    def o(w):  # [K, G, D, E] -> [K*r, G/r, D, E]: no copies, only the grouping changes
        k, _, d, e = w.shape
        return w.reshape(k * r, g_run, d, e)

    return jax.jit(o if kind == "o" else qkv, out_shardings=sharding)


# ---- attention under shard_map -------------------------------------------------------------
class ShardedBackend:
    """Runs `backend` per device under jax.shard_map: q over query heads, k/v and the
    caches over kv heads, metadata replicated. Same interface as the backend it wraps."""

    def __init__(self, backend, mesh: Mesh):
        self.inner = backend
        self.mesh = mesh
        self.name = backend.name
        self.cache_spec = kv_cache_spec(backend)

    def kv_cache_shape(self, num_blocks, block_size, num_kv_heads, head_dim):
        return self.inner.kv_cache_shape(num_blocks, block_size, num_kv_heads, head_dim)

    def __call__(self, q, k, v, kv_cache, md, scale):
        heads, cache = P(None, TP, None), (self.cache_spec, self.cache_spec)

        def local(q, k, v, kv_cache, md):
            return self.inner(q, k, v, kv_cache, md, scale)

        # check_vma off: backends (fori_loop carries, pallas_call) are not written for it.
        fn = jax.shard_map(local, mesh=self.mesh, in_specs=(heads, heads, heads, cache, P()),
                           out_specs=(heads, cache), check_vma=False)  # fmt: skip
        return fn(q, k, v, kv_cache, md)


def shard_attention(backend, mesh: Mesh) -> ShardedBackend:
    return ShardedBackend(backend, mesh)
