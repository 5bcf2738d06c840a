"""converters.hf: the HF -> param-tree mapping, checked shape by shape and number by number."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file

from converters.hf import (
    convert_params,
    expected_hf_shapes,
    expected_param_shapes,
    flatten,
    iter_params,
    load_config,
)
from converters.safetensors_io import SafetensorsCheckpoint, save_file

FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]


def hf_tensors(model_dir) -> dict[str, np.ndarray]:
    ckpt = SafetensorsCheckpoint(model_dir)
    return {name: ckpt.get(name) for name in ckpt.tensors}


@pytest.mark.parametrize("family", FAMILIES)
def test_tree_matches_expected_shapes(hf_dirs, family):
    config = load_config(hf_dirs[family])
    flat = flatten(convert_params(hf_dirs[family], config, "float32"))
    expected = expected_param_shapes(config)
    assert list(flat) == list(expected)  # same leaves, in conversion order
    assert {p: a.shape for p, a in flat.items()} == expected
    assert all(a.dtype == np.float32 for a in flat.values())


def test_config_flags(hf_dirs):
    assert load_config(hf_dirs["qwen2"]).qkv_bias and not load_config(hf_dirs["llama"]).qkv_bias
    qwen3 = load_config(hf_dirs["qwen3"])
    assert qwen3.qk_norm and qwen3.head_dim == 32 and qwen3.tie_word_embeddings
    paths = expected_param_shapes(qwen3)
    assert ("layers_0", "attn", "q_norm", "scale") in paths and ("lm_head", "kernel") not in paths


@pytest.mark.parametrize("family", FAMILIES)
def test_values_follow_the_mapping(hf_dirs, family):
    config = load_config(hf_dirs[family])
    hf = hf_tensors(hf_dirs[family])
    params = convert_params(hf_dirs[family], config, "float32")
    k_heads, g_per, d = config.num_kv_heads, config.q_per_kv, config.head_dim
    for i in range(config.num_layers):
        p, layer = f"model.layers.{i}.", params[f"layers_{i}"]
        qkv = layer["attn"]["qkv"]["kernel"]  # [E, K, G+2, D]
        q = hf[p + "self_attn.q_proj.weight"]
        for k in range(k_heads):
            for g in range(g_per):
                h = k * g_per + g
                np.testing.assert_array_equal(qkv[:, k, g, :], q[h * d : (h + 1) * d].T)
            rows = slice(k * d, (k + 1) * d)
            np.testing.assert_array_equal(
                qkv[:, k, g_per, :], hf[p + "self_attn.k_proj.weight"][rows].T
            )
            np.testing.assert_array_equal(
                qkv[:, k, g_per + 1, :], hf[p + "self_attn.v_proj.weight"][rows].T
            )
        o = hf[p + "self_attn.o_proj.weight"]  # [E, H*D]
        h = k_heads * g_per - 1  # last head: k = K-1, g = G-1
        np.testing.assert_array_equal(layer["attn"]["o"]["kernel"][-1, -1], o[:, h * d :].T)
        gate_up = layer["mlp"]["gate_up"]["kernel"]
        np.testing.assert_array_equal(gate_up[:, 0], hf[p + "mlp.gate_proj.weight"].T)
        np.testing.assert_array_equal(gate_up[:, 1], hf[p + "mlp.up_proj.weight"].T)
        np.testing.assert_array_equal(
            layer["mlp"]["down"]["kernel"], hf[p + "mlp.down_proj.weight"].T
        )
        np.testing.assert_array_equal(
            layer["input_norm"]["scale"], hf[p + "input_layernorm.weight"]
        )
        np.testing.assert_array_equal(
            layer["post_norm"]["scale"], hf[p + "post_attention_layernorm.weight"]
        )
        if config.qkv_bias:
            bias = layer["attn"]["qkv"]["bias"]  # [K, G+2, D]
            np.testing.assert_array_equal(
                bias[1, 0], hf[p + "self_attn.q_proj.bias"][g_per * d :][:d]
            )
            np.testing.assert_array_equal(bias[1, g_per], hf[p + "self_attn.k_proj.bias"][d:])
            np.testing.assert_array_equal(bias[0, g_per + 1], hf[p + "self_attn.v_proj.bias"][:d])
        if config.qk_norm:
            np.testing.assert_array_equal(
                layer["attn"]["q_norm"]["scale"], hf[p + "self_attn.q_norm.weight"]
            )
            np.testing.assert_array_equal(
                layer["attn"]["k_norm"]["scale"], hf[p + "self_attn.k_norm.weight"]
            )
    np.testing.assert_array_equal(params["embed"]["embedding"], hf["model.embed_tokens.weight"])
    np.testing.assert_array_equal(params["norm"]["scale"], hf["model.norm.weight"])
    if not config.tie_word_embeddings:
        np.testing.assert_array_equal(params["lm_head"]["kernel"], hf["lm_head.weight"].T)


def test_qkv_kernel_reproduces_hf_projections(hf_dirs):
    """x @ qkv gives HF's q/k/v head for head, the contract the model's einsum relies on."""
    config = load_config(hf_dirs["qwen2"])
    hf = hf_tensors(hf_dirs["qwen2"])
    qkv = convert_params(hf_dirs["qwen2"], config, "float32")["layers_1"]["attn"]["qkv"]
    x = np.random.default_rng(0).standard_normal((5, config.hidden_size)).astype(np.float32)
    ours = np.einsum("te,ekgd->tkgd", x, qkv["kernel"]) + qkv["bias"]
    p, k, g, d = "model.layers.1.self_attn.", config.num_kv_heads, config.q_per_kv, config.head_dim
    q_hf = (x @ hf[p + "q_proj.weight"].T + hf[p + "q_proj.bias"]).reshape(5, k, g, d)
    v_hf = (x @ hf[p + "v_proj.weight"].T + hf[p + "v_proj.bias"]).reshape(5, k, d)
    np.testing.assert_allclose(ours[:, :, :g], q_hf, rtol=1e-5, atol=1e-5)  # f32 sum order
    np.testing.assert_allclose(ours[:, :, g + 1], v_hf, rtol=1e-5, atol=1e-5)


def test_bfloat16_cast(hf_dirs):
    config = load_config(hf_dirs["llama"])
    leaves = dict(iter_params(hf_dirs["llama"], config, "bfloat16"))
    emb = leaves[("embed", "embedding")]
    assert emb.dtype == ml_dtypes.bfloat16
    want = hf_tensors(hf_dirs["llama"])["model.embed_tokens.weight"].astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(emb, want)


def test_tied_checkpoint_with_lm_head_ignores_it(hf_dirs, tmp_path):
    """Some tied checkpoints still store lm_head.weight; it must not become a param."""
    src = hf_dirs["qwen3"]
    tensors = load_file(f"{src}/model.safetensors")
    tensors["lm_head.weight"] = np.full_like(tensors["model.embed_tokens.weight"], 7.0)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(open(f"{src}/config.json").read())
    flat = flatten(convert_params(tmp_path, dtype="float32"))
    assert ("lm_head", "kernel") not in flat
    assert len(flat) == len(expected_param_shapes(load_config(tmp_path)))


def test_expected_hf_shapes_cover_every_checkpoint_tensor(hf_dirs):
    """Nothing in a real checkpoint is silently dropped (tied models: lm_head excepted)."""
    for family, path in hf_dirs.items():
        names = set(SafetensorsCheckpoint(path).tensors) - {"lm_head.weight"}
        assert names <= set(expected_hf_shapes(load_config(path))), family


def test_safetensors_writer_round_trips_bfloat16(tmp_path):
    a = np.arange(12, dtype=np.float32).reshape(3, 4).astype(ml_dtypes.bfloat16)
    b = np.array([1, 2, 3], dtype=np.int64)
    save_file({"a": a, "b": b}, str(tmp_path / "x.safetensors"))
    ckpt = SafetensorsCheckpoint(tmp_path)
    np.testing.assert_array_equal(ckpt.get("a"), a)
    np.testing.assert_array_equal(ckpt.get("b"), b)
    assert ckpt.get("a").dtype == ml_dtypes.bfloat16
