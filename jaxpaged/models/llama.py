"""The Llama family in Flax: Llama 2/3, Mistral, SmolLM, Qwen2/2.5 (q/k/v bias), Qwen3 (q/k norm).

    token_ids[T] -> embed -> N x DecoderLayer -> norm -> (rows at logits_indices) -> logits

Each DecoderLayer: RMSNorm -> fused QKV einsum -> (q/k RMSNorm) -> RoPE -> attention backend
(writes this step's K/V into the paged pool, attends over each request's blocks) -> O proj,
residual; RMSNorm -> fused gate/up einsum -> SiLU * up -> down, residual.

Layers are a Python loop, so jit unrolls them and every layer has its own weight and KV
arrays (a `lax.scan` over stacked layers moved 3x the floor's bytes on an H100, GPU_NOTES).
Weights keep explicit head axes: qkv [E, K, G+2, D] (per kv head: G query heads, then k,
then v) and gate_up [E, 2, F], so sharding kv heads or the MLP hidden over "tp" splits
whole heads. Every parameter declares its logical axes; `LOGICAL_AXIS_RULES` in
jaxpaged/sharding.py maps them to mesh axes.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxpaged.attention.backend import AttentionBackend, KVCache
from jaxpaged.attention.metadata import AttentionMetadata
from jaxpaged.config import ModelConfig

_init = nn.initializers.normal(stddev=0.02)


def _param(module: nn.Module, name: str, shape, axes, init=_init, dtype=jnp.float32):
    if not module.is_initializing() and module.has_variable("params", name):
        # Applying: read the parameter directly. module.param() would also trace the
        # initializer (jax.eval_shape) to check the shape, ~20% of tracing a step bucket.
        value = nn.meta.unbox(module.get_variable("params", name))
        if tuple(value.shape) != tuple(shape):
            raise ValueError(
                f"parameter {module.path}/{name} has shape {tuple(value.shape)}, but the model "
                f"config implies {tuple(shape)}"
            )
        return value
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


class Proj(nn.Module):
    """A projection `einsum(eqn, x, kernel) (+ bias)` whose kernel keeps explicit axes."""

    eqn: str
    shape: tuple[int, ...]
    axes: tuple[str, ...]
    dtype: Any
    param_dtype: Any
    bias_axes: tuple[str, ...] | None = None
    """Axes of the bias (the kernel's trailing ones); None for no bias."""
    out_dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        w = _param(self, "kernel", self.shape, self.axes, dtype=self.param_dtype)
        y = jnp.einsum(self.eqn, x, w.astype(self.dtype), preferred_element_type=self.out_dtype)
        if self.bias_axes is not None:
            shape = self.shape[-len(self.bias_axes) :]
            b = _param(self, "bias", shape, self.bias_axes, nn.initializers.zeros, self.param_dtype)
            y = y + b.astype(y.dtype)
        return y


class RMSNorm(nn.Module):
    eps: float
    axis_name: str = "norm"
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = _param(
            self, "scale", (x.shape[-1],), (self.axis_name,), nn.initializers.ones, self.param_dtype
        )
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        # As HF: normalise in float32, cast back, then scale in the input dtype.
        return scale.astype(x.dtype) * y.astype(x.dtype)


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """f32[head_dim // 2] inverse frequencies, with llama3 / linear rope_scaling applied."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    scaling = config.rope_scaling_dict
    if not scaling:
        return inv_freq.astype(np.float32)
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        return (inv_freq / scaling["factor"]).astype(np.float32)
    if kind != "llama3":
        raise ValueError(f"Unsupported rope_scaling type {kind!r}; supported: llama3, linear.")
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """x [T, N, D] rotated by positions i32[T] (HF's rotate-half convention)."""
    angle = positions.astype(jnp.float32)[:, None] * jnp.asarray(inv_freq)[None, :]
    cos = jnp.cos(angle)[:, None, :].astype(x.dtype)
    sin = jnp.sin(angle)[:, None, :].astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


class Attention(nn.Module):
    config: ModelConfig
    backend: AttentionBackend
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x, positions, kv_cache: KVCache, md: AttentionMetadata):
        c = self.config
        e, kh, g, d = c.hidden_size, c.num_kv_heads, c.q_per_kv, c.head_dim
        dt, pdt = self.dtype, self.param_dtype
        qkv = Proj(
            "te,ekgd->tkgd", (e, kh, g + 2, d), ("embed", "kv_heads", "qkv", "head_dim"), dt, pdt,
            bias_axes=("kv_heads", "qkv", "head_dim") if c.qkv_bias else None, name="qkv",
        )(x)  # fmt: skip
        q = qkv[:, :, :g].reshape(-1, kh * g, d)  # query head h = k * G + g, as HF
        k, v = qkv[:, :, g], qkv[:, :, g + 1]  # [T, K, D]
        if c.qk_norm:
            q = RMSNorm(c.rms_norm_eps, "head_dim", pdt, name="q_norm")(q)
            k = RMSNorm(c.rms_norm_eps, "head_dim", pdt, name="k_norm")(k)
        inv_freq = rope_inv_freq(c)
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        out, kv_cache = self.backend(q, k, v, kv_cache, md, 1.0 / math.sqrt(d))
        o_axes = ("kv_heads", "q_per_kv", "head_dim", "embed")
        o = Proj("tkgd,kgde->te", (kh, g, d, e), o_axes, dt, pdt, name="o")
        return o(out.reshape(-1, kh, g, d)), kv_cache


class MLP(nn.Module):
    config: ModelConfig
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x):
        e, f = self.config.hidden_size, self.config.intermediate_size
        dt, pdt = self.dtype, self.param_dtype
        h = Proj("te,ecf->tcf", (e, 2, f), ("embed", "gate_up", "mlp"), dt, pdt, name="gate_up")(x)
        h = jax.nn.silu(h[:, 0]) * h[:, 1]
        return Proj("tf,fe->te", (f, e), ("mlp", "embed"), dt, pdt, name="down")(h)


class DecoderLayer(nn.Module):
    config: ModelConfig
    backend: AttentionBackend
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x, positions, kv_cache: KVCache, md: AttentionMetadata):
        c, dt, pdt = self.config, self.dtype, self.param_dtype
        h = RMSNorm(c.rms_norm_eps, param_dtype=pdt, name="input_norm")(x)
        h, kv_cache = Attention(c, self.backend, dt, pdt, name="attn")(h, positions, kv_cache, md)
        x = x + h
        h = RMSNorm(c.rms_norm_eps, param_dtype=pdt, name="post_norm")(x)
        return x + MLP(c, dt, pdt, name="mlp")(h), kv_cache


class LlamaForCausalLM(nn.Module):
    config: ModelConfig
    backend: AttentionBackend
    dtype: Any = jnp.bfloat16
    """Activation dtype."""
    param_dtype: Any = jnp.bfloat16

    @nn.compact
    def __call__(
        self,
        token_ids: jax.Array,  # i32[T]
        positions: jax.Array,  # i32[T]
        kv_caches: list[KVCache],  # one per layer
        md: AttentionMetadata,
        logits_indices: jax.Array | None = None,  # i32[R]: rows to compute logits for
    ) -> tuple[jax.Array, list[KVCache]]:  # (f32[R or T, V], updated kv_caches)
        c = self.config
        embed = nn.Embed(
            c.vocab_size,
            c.hidden_size,
            embedding_init=nn.with_logical_partitioning(_init, ("vocab", "embed")),
            param_dtype=self.param_dtype,
            dtype=self.dtype,
            name="embed",
        )
        x = embed(token_ids)
        new_caches = []
        for i in range(c.num_layers):
            layer = DecoderLayer(c, self.backend, self.dtype, self.param_dtype, name=f"layers_{i}")
            x, cache = layer(x, positions, kv_caches[i], md)
            new_caches.append(cache)
        x = RMSNorm(c.rms_norm_eps, param_dtype=self.param_dtype, name="norm")(x)
        if logits_indices is not None:
            x = x[logits_indices]
        if c.tie_word_embeddings:
            w = embed.embedding.astype(self.dtype)
            logits = jnp.einsum("te,ve->tv", x, w, preferred_element_type=jnp.float32)
        else:
            shape, axes = (c.hidden_size, c.vocab_size), ("embed", "vocab")
            lm_head = Proj("te,ev->tv", shape, axes, self.dtype, self.param_dtype,
                           out_dtype=jnp.float32, name="lm_head")  # fmt: skip
            logits = lm_head(x)
        return logits, new_caches


def build_model(config: ModelConfig, backend: AttentionBackend, dtype) -> LlamaForCausalLM:
    return LlamaForCausalLM(config, backend, dtype=dtype, param_dtype=dtype)


def abstract_params(model: LlamaForCausalLM, block_size: int = 16):
    """The params tree as boxed ShapeDtypeStructs (nn.Partitioned carries logical axes)."""
    c = model.config

    def init(rng):
        shape = model.backend.kv_cache_shape(1, block_size, c.num_kv_heads, c.head_dim)
        caches = [(jnp.zeros(shape, model.dtype),) * 2 for _ in range(c.num_layers)]
        md = AttentionMetadata(
            slot_mapping=jnp.zeros((1,), jnp.int32),
            query_start_loc=jnp.array([0, 1], jnp.int32),
            seq_lens=jnp.ones((1,), jnp.int32),
            block_tables=jnp.zeros((1, 1), jnp.int32),
            token_req_idx=jnp.zeros((1,), jnp.int32),
        )
        one = jnp.zeros((1,), jnp.int32)
        return model.init(rng, one, one, caches, md)["params"]

    return jax.eval_shape(init, jax.random.key(0))
