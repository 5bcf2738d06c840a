"""jaxpaged.models.loader: orbax and HF loading, dummy params and presets."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from converters import convert as convert_mod
from converters.hf import (
    CheckpointError,
    convert_params,
    expected_param_shapes,
    flatten,
    load_config,
    nest,
)
from jaxpaged.models.loader import PRESETS, config_from_preset, dummy_params, load_params


def assert_same_tree(got: dict, want: dict):
    got, want = flatten(got), flatten(want)
    assert got.keys() == want.keys()
    for path, array in want.items():
        assert isinstance(got[path], jax.Array), path
        np.testing.assert_array_equal(np.asarray(got[path]), array, err_msg=str(path))


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_hf_dir_loads_on_the_fly(hf_dirs, family):
    config = load_config(hf_dirs[family])
    params = load_params(hf_dirs[family], config, jnp.float32)
    assert_same_tree(params, convert_params(hf_dirs[family], config, "float32"))


def test_orbax_dir_restores_with_dtype_and_sharding(hf_dirs, tmp_path):
    config = load_config(hf_dirs["qwen2"])
    out = tmp_path / "conv"
    convert_mod.convert(hf_dirs["qwen2"], str(out), dtype="bfloat16")
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[-1])
    params = load_params(out, config, jnp.float32, shardings=sharding)
    want = {
        p: a.astype(np.float32)
        for p, a in flatten(convert_params(hf_dirs["qwen2"], config)).items()
    }
    flat = flatten(params)
    assert all(a.dtype == jnp.float32 and a.sharding == sharding for a in flat.values())
    assert_same_tree(params, nest(want))  # bf16 on disk, widened exactly


def test_orbax_dir_with_wrong_config_is_rejected(hf_dirs, tmp_path):
    out = tmp_path / "conv"
    convert_mod.convert(hf_dirs["llama"], str(out), dtype="float32")
    other = load_config(hf_dirs["mistral"])  # same sizes but ...
    bigger = type(other)(**{**other.__dict__, "intermediate_size": 128})
    with pytest.raises(
        CheckpointError,
        match=r"mlp/gate_up/kernel has shape \[64, 2, 96\], expected \[64, 2, 128\]",
    ):
        load_params(out, bigger, jnp.float32)


def test_not_a_model_dir(tmp_path):
    with pytest.raises(CheckpointError, match="neither a converted jaxpaged dir"):
        load_params(tmp_path, config_from_preset("smollm2-135m"))


def test_per_leaf_shardings_tree(hf_dirs):
    config = load_config(hf_dirs["mistral"])
    dev = jax.devices()[0]
    tree = {p: jax.sharding.SingleDeviceSharding(dev) for p in expected_param_shapes(config)}
    params = load_params(hf_dirs["mistral"], config, jnp.bfloat16, shardings=nest(tree))
    assert all(a.dtype == jnp.bfloat16 for a in flatten(params).values())
    missing = dict(tree)
    missing.pop(("norm", "scale"))
    with pytest.raises(ValueError, match="no entry for norm/scale"):
        load_params(hf_dirs["mistral"], config, jnp.bfloat16, shardings=nest(missing))


# Published parameter counts (model cards); ModelConfig.num_params omits only norms of
# q/k and biases, far below the 1% tolerance.
PUBLISHED_PARAMS = {
    "llama3-8b": 8.03e9,
    "llama3.2-1b": 1.24e9,
    "qwen3-0.6b": 0.596e9,  # 0.6B with tied embeddings (0.44B non-embedding)
    "qwen2.5-1.5b": 1.54e9,
    "smollm2-135m": 134.5e6,
}


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_shapes(name):
    config = config_from_preset(name)
    assert config.num_params() == pytest.approx(PUBLISHED_PARAMS[name], rel=0.01)
    abstract = jax.eval_shape(lambda: dummy_params(config, jnp.bfloat16))
    shapes = {p: a.shape for p, a in flatten(abstract).items()}
    assert shapes == expected_param_shapes(config)
    assert all(a.dtype == jnp.bfloat16 for a in flatten(abstract).values())


def test_llama3_rope_scaling_presets():
    assert config_from_preset("llama3-8b").rope_scaling_dict["factor"] == 8.0
    scaling = config_from_preset("llama3.2-1b").rope_scaling_dict
    assert scaling == {
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    with pytest.raises(ValueError, match="Unknown preset 'gpt5'"):
        config_from_preset("gpt5")


def test_dummy_params_values(hf_dirs):
    config = load_config(hf_dirs["qwen3"])
    flat = flatten(dummy_params(config, jnp.float32, seed=1))
    assert {p: a.shape for p, a in flat.items()} == expected_param_shapes(config)
    for path, a in flat.items():
        if path[-1] == "scale":
            assert np.all(np.asarray(a) == 1.0), path
    emb = np.asarray(flat[("embed", "embedding")])
    assert abs(emb.std() - 0.02) < 0.002 and abs(emb.mean()) < 0.002
    qkv = np.asarray(flat[("layers_0", "attn", "qkv", "kernel")])
    assert not np.allclose(qkv, np.asarray(flat[("layers_1", "attn", "qkv", "kernel")]))
    again = dummy_params(config, jnp.float32, seed=1)["embed"]["embedding"]
    np.testing.assert_array_equal(np.asarray(again), emb)  # seeded: reproducible
