"""Params onto device: from a converted (orbax) dir, an HF dir, or random for benchmarks.

Data flow:
- orbax dir (MODEL/params exists, written by `jaxpaged convert`): the saved shapes are
  checked against `expected_param_shapes(config)`, then orbax restores into abstract
  targets that carry the wanted dtype and sharding, so each shard is read straight into
  its device buffer with no full host copy.
- HF dir (*.safetensors): converted on the fly by converters.hf.iter_params, one leaf at a
  time, each `jax.device_put` to its sharding as soon as it is produced; host memory holds
  one layer at most.
- `dummy_params`: random weights generated on device by jitted per-shape initializers
  (nothing on the host or on disk), for benchmarks of shapes we have no checkpoint for (PRESETS).

`shardings` everywhere is either None (default device), one Sharding for every leaf, or a
nested dict of Shardings with the param tree's structure.
"""

from __future__ import annotations

import functools
import glob
import logging
import os

import jax
import jax.numpy as jnp

from converters.hf import CheckpointError, expected_param_shapes, flatten, iter_params, nest
from jaxpaged.config import ModelConfig

logger = logging.getLogger(__name__)

_LLAMA31_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0}
_LLAMA31_ROPE["original_max_position_embeddings"] = 8192

PRESETS: dict[str, dict] = {
    # Llama 3.1 8B (the Llama 3 8B shapes with 3.1's 128k rope scaling).
    "llama3-8b": dict(
        model_type="llama",
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        rope_theta=500000.0,
        rope_scaling={**_LLAMA31_ROPE, "factor": 8.0},
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=128000,
        eos_token_id=[128001, 128008, 128009],
    ),  # fmt: skip
    "llama3.2-1b": dict(
        model_type="llama",
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        rope_theta=500000.0,
        rope_scaling={**_LLAMA31_ROPE, "factor": 32.0},
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=128000,
        eos_token_id=[128001, 128008, 128009],
    ),  # fmt: skip
    "qwen3-0.6b": dict(
        model_type="qwen3",
        vocab_size=151936,
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        rope_theta=1000000.0,
        max_position_embeddings=40960,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        bos_token_id=151643,
        eos_token_id=151645,
    ),  # fmt: skip
    "qwen2.5-1.5b": dict(
        model_type="qwen2",
        vocab_size=151936,
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        head_dim=128,
        rope_theta=1000000.0,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        sliding_window=32768,
        use_sliding_window=False,
        bos_token_id=151643,
        eos_token_id=151645,
    ),  # fmt: skip
    "smollm2-135m": dict(
        model_type="llama",
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        rope_theta=100000.0,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    ),  # fmt: skip
}


def config_from_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}; known: {', '.join(PRESETS)}.")
    return ModelConfig.from_hf_dict(PRESETS[name])


def _leaf_shardings(config: ModelConfig, shardings) -> dict:
    """Flat {path: Sharding} for every param leaf."""
    paths = list(expected_param_shapes(config))
    if shardings is None:
        shardings = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if isinstance(shardings, jax.sharding.Sharding):
        return dict.fromkeys(paths, shardings)
    flat = flatten(shardings)
    missing = [p for p in paths if p not in flat]
    if missing:
        raise ValueError(f"shardings has no entry for {'/'.join(missing[0])}.")
    return {p: flat[p] for p in paths}


def _check_saved_shapes(ckptr, path: str, config: ModelConfig) -> None:
    saved = {
        p: tuple(m.shape) for p, m in flatten(dict(ckptr.metadata(path).item_metadata)).items()
    }
    for p, want in expected_param_shapes(config).items():
        found = saved.get(p)
        if found != want:
            what = "missing" if found is None else f"has shape {list(found)}"
            raise CheckpointError(f"{path}: param {'/'.join(p)} {what}, expected {list(want)}.")


def _restore_orbax(path: str, config: ModelConfig, dtype, shardings) -> dict:
    import orbax.checkpoint as ocp

    leaf_shardings = _leaf_shardings(config, shardings)
    target = {
        p: jax.ShapeDtypeStruct(shape, dtype, sharding=leaf_shardings[p])
        for p, shape in expected_param_shapes(config).items()
    }
    # orbax stages restored bytes in host memory. Restoring a 2.2 GB model onto an H100
    # peaked at 6.6 GB host RSS with the default 96 GB window, 5.0 GB with 1 GB (the rest
    # is orbax/tensorstore's own; the HF path below peaks at 3.2 GB). See docs/conversion.md.
    handler = ocp.StandardCheckpointHandler(restore_concurrent_gb=1)
    with ocp.Checkpointer(handler) as ckptr:
        _check_saved_shapes(ckptr, path, config)
        return ckptr.restore(path, args=ocp.args.StandardRestore(nest(target)))


def _load_hf(model_path: str, config: ModelConfig, dtype, shardings) -> dict:
    leaf_shardings = _leaf_shardings(config, shardings)
    # Convert on the host in the target dtype (bf16 halves the transfer), one leaf at a time.
    host_dtype = jnp.dtype(dtype)
    params = {}
    for p, host in iter_params(model_path, config, host_dtype, progress=True):
        params[p] = jax.device_put(host, leaf_shardings[p])
        del host
    return nest(params)


def load_params(model_path: str | os.PathLike, config: ModelConfig, dtype=jnp.bfloat16,
                shardings=None) -> dict:  # fmt: skip
    """Params for `config` from a converted dir or an HF dir, placed per `shardings`."""
    model_path = os.fspath(model_path)
    params_dir = os.path.join(model_path, "params")
    if os.path.isdir(params_dir):
        logger.info("Restoring orbax params from %s", params_dir)
        return _restore_orbax(os.path.abspath(params_dir), config, dtype, shardings)
    if glob.glob(os.path.join(model_path, "*.safetensors")):
        logger.info("Converting HF safetensors from %s on the fly", model_path)
        return _load_hf(model_path, config, dtype, shardings)
    raise CheckpointError(
        f"{model_path}: neither a converted jaxpaged dir (no params/) nor a Hugging Face dir "
        "(no *.safetensors)."
    )


@functools.cache
def _random_leaf_fn(shape: tuple[int, ...], dtype, sharding, ones: bool):
    """A jitted initializer per (shape, dtype, sharding), shared by every layer.

    One jit over the whole tree compiled a random kernel per leaf: 23 s for SmolLM2's 272
    leaves on an H100 host. Per-shape functions compile ~10 kernels whatever the depth.
    """

    def init(key, index):
        if ones:
            return jnp.ones(shape, dtype)
        key = jax.random.fold_in(key, index)
        return (jax.random.normal(key, shape, jnp.float32) * 0.02).astype(dtype)

    return jax.jit(init, out_shardings=sharding)


def dummy_params(config: ModelConfig, dtype=jnp.bfloat16, shardings=None, seed: int = 0) -> dict:
    """Random params (normal * 0.02, norm scales 1) generated on device leaf by leaf, each
    straight into its sharding; no host arrays, nothing on disk."""
    leaf_shardings = _leaf_shardings(config, shardings)
    dtype = jnp.dtype(dtype)
    # XLA's RngBitGenerator ("unsafe_rbg") rather than threefry: threefry's unrolled hash
    # is slow to compile, and rbg generates sharded outputs without cross-device work.
    key = jax.random.key(seed, impl="unsafe_rbg")
    flat = {}
    for index, (path, shape) in enumerate(expected_param_shapes(config).items()):
        fn = _random_leaf_fn(shape, dtype, leaf_shardings[path], path[-1] == "scale")
        flat[path] = fn(key, index)
    return nest(flat)
