"""Hugging Face checkpoint dir -> jaxpaged's Flax parameter tree, one tensor at a time.

Data flow: `load_config(dir)` reads config.json into a ModelConfig; `open_checkpoint(dir,
config)` parses every shard header and checks that each tensor the model needs is there
with the right shape, before a single weight is read; `iter_params(...)` then walks the
model in order (embedding, each layer, final norm, lm_head), reading a layer's HF tensors,
fusing them (q/k/v -> qkv, gate/up -> gate_up), casting, and yielding `(path, array)`
leaves. Nothing but the tensors of the current layer is held, so a caller that puts each
leaf on device (loader.py) or into the output tree (convert.py) peaks near the output size
plus one layer, never at twice the model.

Param tree (K kv heads, G = heads // K, D head_dim, E hidden, F intermediate, V vocab;
HF query head h = k * G + g):

    embed/embedding [V, E]
    layers_{i}/input_norm/scale [E]
    layers_{i}/attn/qkv/kernel [E, K, G+2, D]   slots 0..G-1 q, G k, G+1 v
    layers_{i}/attn/qkv/bias [K, G+2, D]        qkv_bias only (Qwen2)
    layers_{i}/attn/q_norm/scale, k_norm/scale [D]  qk_norm only (Qwen3)
    layers_{i}/attn/o/kernel [K, G, D, E]
    layers_{i}/post_norm/scale [E]
    layers_{i}/mlp/gate_up/kernel [E, 2, F]     index 0 gate, 1 up
    layers_{i}/mlp/down/kernel [F, E]
    norm/scale [E]
    lm_head/kernel [E, V]                        untied models only
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import ml_dtypes
import numpy as np
from tqdm import tqdm

from converters.safetensors_io import SafetensorsCheckpoint, SafetensorsError
from jaxpaged.config import ModelConfig

Path = tuple[str, ...]
DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32, "float16": np.float16}


class CheckpointError(ValueError):
    """A checkpoint the converter cannot use; the message names the file or tensor."""


def np_dtype(dtype) -> np.dtype:
    """'bfloat16' / 'float32' / a numpy or jax dtype -> numpy dtype."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise CheckpointError(f"Unsupported dtype {dtype!r}; choose one of {list(DTYPES)}.")
        return np.dtype(DTYPES[dtype])
    return np.dtype(dtype)


def expected_param_shapes(config: ModelConfig) -> dict[Path, tuple[int, ...]]:
    """Every leaf path of the param tree and its shape, in conversion order."""
    k, g, d = config.num_kv_heads, config.q_per_kv, config.head_dim
    e, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    shapes: dict[Path, tuple[int, ...]] = {("embed", "embedding"): (v, e)}
    for i in range(config.num_layers):
        layer = f"layers_{i}"
        shapes[(layer, "input_norm", "scale")] = (e,)
        shapes[(layer, "attn", "qkv", "kernel")] = (e, k, g + 2, d)
        if config.qkv_bias:
            shapes[(layer, "attn", "qkv", "bias")] = (k, g + 2, d)
        if config.qk_norm:
            shapes[(layer, "attn", "q_norm", "scale")] = (d,)
            shapes[(layer, "attn", "k_norm", "scale")] = (d,)
        shapes[(layer, "attn", "o", "kernel")] = (k, g, d, e)
        shapes[(layer, "post_norm", "scale")] = (e,)
        shapes[(layer, "mlp", "gate_up", "kernel")] = (e, 2, f)
        shapes[(layer, "mlp", "down", "kernel")] = (f, e)
    shapes[("norm", "scale")] = (e,)
    if not config.tie_word_embeddings:
        shapes[("lm_head", "kernel")] = (e, v)
    return shapes


def expected_hf_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every HF tensor the conversion reads and the shape it must have."""
    h, k, d = config.num_heads, config.num_kv_heads, config.head_dim
    e, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    shapes = {"model.embed_tokens.weight": (v, e), "model.norm.weight": (e,)}
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (e,)
        shapes[p + "post_attention_layernorm.weight"] = (e,)
        shapes[p + "self_attn.q_proj.weight"] = (h * d, e)
        shapes[p + "self_attn.k_proj.weight"] = (k * d, e)
        shapes[p + "self_attn.v_proj.weight"] = (k * d, e)
        shapes[p + "self_attn.o_proj.weight"] = (e, h * d)
        if config.qkv_bias:
            shapes[p + "self_attn.q_proj.bias"] = (h * d,)
            shapes[p + "self_attn.k_proj.bias"] = (k * d,)
            shapes[p + "self_attn.v_proj.bias"] = (k * d,)
        if config.qk_norm:
            shapes[p + "self_attn.q_norm.weight"] = (d,)
            shapes[p + "self_attn.k_norm.weight"] = (d,)
        shapes[p + "mlp.gate_proj.weight"] = (f, e)
        shapes[p + "mlp.up_proj.weight"] = (f, e)
        shapes[p + "mlp.down_proj.weight"] = (e, f)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, e)
    return shapes


def load_config(model_dir: str | os.PathLike) -> ModelConfig:
    """config.json -> ModelConfig; unsupported model types raise ModelConfig's ValueError."""
    if not os.path.isdir(model_dir):
        raise CheckpointError(f"{model_dir}: not a directory.")
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise CheckpointError(f"{model_dir}: no config.json; is this a Hugging Face model dir?")
    return ModelConfig.from_dir(model_dir)


def open_checkpoint(model_dir: str | os.PathLike, config: ModelConfig) -> SafetensorsCheckpoint:
    """Parse the shard headers and check every expected tensor's presence and shape."""
    try:
        ckpt = SafetensorsCheckpoint(model_dir)
    except SafetensorsError as e:
        raise CheckpointError(str(e)) from None
    for name, want in expected_hf_shapes(config).items():
        found = ckpt.shape(name)
        if found is None:
            raise CheckpointError(
                f"{model_dir}: missing tensor {name} (expected shape {list(want)})."
            )
        if found != want:
            raise CheckpointError(
                f"{model_dir}: tensor {name} has shape {list(found)}, expected {list(want)}."
            )
    return ckpt


def _layer_params(
    read: Callable[[str], np.ndarray], config: ModelConfig, i: int, dtype: np.dtype
) -> Iterator[tuple[Path, np.ndarray]]:
    k, g, d, e = config.num_kv_heads, config.q_per_kv, config.head_dim, config.hidden_size
    p, layer = f"model.layers.{i}.self_attn.", f"layers_{i}"

    def cast(x: np.ndarray) -> np.ndarray:
        # One copy does both the layout change and the dtype cast.
        return np.ascontiguousarray(x, dtype=dtype)

    yield (layer, "input_norm", "scale"), cast(read(f"model.layers.{i}.input_layernorm.weight"))
    # HF rows of q_proj are (head, dim) with head = kv * G + g, so [H*D, E] -> [K, G, D, E].
    qkv = np.concatenate(
        [
            read(p + "q_proj.weight").reshape(k, g, d, e),
            read(p + "k_proj.weight").reshape(k, 1, d, e),
            read(p + "v_proj.weight").reshape(k, 1, d, e),
        ],
        axis=1,
    )
    yield (layer, "attn", "qkv", "kernel"), cast(qkv.transpose(3, 0, 1, 2))
    del qkv
    if config.qkv_bias:
        bias = [read(p + "q_proj.bias").reshape(k, g, d)]
        bias += [read(p + n).reshape(k, 1, d) for n in ("k_proj.bias", "v_proj.bias")]
        yield (layer, "attn", "qkv", "bias"), cast(np.concatenate(bias, axis=1))
    if config.qk_norm:
        yield (layer, "attn", "q_norm", "scale"), cast(read(p + "q_norm.weight"))
        yield (layer, "attn", "k_norm", "scale"), cast(read(p + "k_norm.weight"))
    # o_proj [E, H*D]: its columns are (head, dim), so transpose then split the heads.
    o = read(p + "o_proj.weight").T.reshape(k, g, d, e)
    yield (layer, "attn", "o", "kernel"), cast(o)
    post = read(f"model.layers.{i}.post_attention_layernorm.weight")
    yield (layer, "post_norm", "scale"), cast(post)
    mlp = f"model.layers.{i}.mlp."
    gate_up = np.stack([read(mlp + "gate_proj.weight"), read(mlp + "up_proj.weight")], axis=0)
    yield (layer, "mlp", "gate_up", "kernel"), cast(gate_up.transpose(2, 0, 1))
    del gate_up
    yield (layer, "mlp", "down", "kernel"), cast(read(mlp + "down_proj.weight").T)


def iter_params(
    model_dir: str | os.PathLike,
    config: ModelConfig | None = None,
    dtype="bfloat16",
    progress: bool = False,
) -> Iterator[tuple[Path, np.ndarray]]:
    """Yield `(path, host array)` for every leaf, in expected_param_shapes order.

    The checkpoint is validated before the first leaf is yielded, so a bad checkpoint fails
    before any work (or device memory) is spent.
    """
    config = config or load_config(model_dir)
    dtype = np_dtype(dtype)
    ckpt = open_checkpoint(model_dir, config)
    read = ckpt.get
    steps = tqdm(total=config.num_layers + 2, desc="Converting", unit="layer", disable=not progress)
    with steps:
        embed = read("model.embed_tokens.weight")
        yield ("embed", "embedding"), np.ascontiguousarray(embed, dtype=dtype)
        del embed
        steps.update()
        for i in range(config.num_layers):
            yield from _layer_params(read, config, i, dtype)
            steps.update()
        yield ("norm", "scale"), np.ascontiguousarray(read("model.norm.weight"), dtype=dtype)
        # A tied checkpoint may still carry lm_head.weight (a copy of the embedding): ignore it.
        if not config.tie_word_embeddings:
            yield ("lm_head", "kernel"), np.ascontiguousarray(read("lm_head.weight").T, dtype=dtype)
        steps.update()


def nest(flat: dict[Path, object]) -> dict:
    """{('a', 'b'): x} -> {'a': {'b': x}}."""
    tree: dict = {}
    for path, leaf in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = leaf
    return tree


def flatten(tree: dict, prefix: Path = ()) -> dict[Path, object]:
    """Inverse of nest()."""
    flat: dict[Path, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, prefix + (key,)))
        else:
            flat[prefix + (key,)] = value
    return flat


def convert_params(
    model_dir: str | os.PathLike,
    config: ModelConfig | None = None,
    dtype="bfloat16",
    progress: bool = False,
) -> dict:
    """The whole param tree as nested dicts of host (numpy) arrays."""
    return nest(dict(iter_params(model_dir, config, dtype, progress)))
