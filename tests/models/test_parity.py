"""Model parity with HF transformers on tiny random checkpoints, one per architecture.

Each checkpoint is written by transformers, converted with `jaxpaged convert` (float32), and
compared: prefill logits (relative error ||a - b|| / ||b|| <= 1e-4), then a 32-token greedy
continuation through the paged reference path (LLM.generate) must be token-identical to
transformers' greedy generate.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as tf

from converters.convert import convert
from jaxpaged.attention.metadata import AttentionMetadata
from jaxpaged.attention.reference import ReferenceBackend
from jaxpaged.config import ModelConfig
from jaxpaged.llm import LLM
from jaxpaged.models.llama import build_model
from jaxpaged.models.loader import load_params
from jaxpaged.sampling_params import SamplingParams

BASE = dict(vocab_size=192, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            max_position_embeddings=256)  # fmt: skip
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}  # fmt: skip

# name -> (config class, model class, config overrides)
ARCHS = {
    "llama2": (tf.LlamaConfig, tf.LlamaForCausalLM, dict(num_attention_heads=4)),
    "llama3": (tf.LlamaConfig, tf.LlamaForCausalLM,
               dict(num_attention_heads=8, num_key_value_heads=2, rope_theta=500000.0,
                    rope_scaling=LLAMA3_ROPE)),
    "mistral": (tf.MistralConfig, tf.MistralForCausalLM,
                dict(num_attention_heads=4, num_key_value_heads=1, sliding_window=None)),
    "smollm": (tf.LlamaConfig, tf.LlamaForCausalLM,
               dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True)),
    "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM,
              dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM,
              dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                   tie_word_embeddings=False)),
}  # fmt: skip


def _make_checkpoint(path, arch: str):
    config_cls, model_cls, overrides = ARCHS[arch]
    torch.manual_seed(hash(arch) % 1000)
    model = model_cls(config_cls(**BASE, **overrides)).eval()
    with torch.no_grad():  # random norms and biases, so a swapped or dropped one shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.1)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.5)
            else:  # larger weights than the 0.02 init: sharper logits, fewer near-ties
                p.normal_(0.0, 0.08)
    model.save_pretrained(str(path), safe_serialization=True)
    return model


@pytest.fixture(scope="module", params=list(ARCHS))
def converted(request, tmp_path_factory):
    arch = request.param
    root = tmp_path_factory.mktemp(arch)
    hf_model = _make_checkpoint(root / "hf", arch)
    convert(str(root / "hf"), str(root / "jax"), dtype="float32")
    return arch, hf_model, str(root / "jax")


def _prefill_logits(model_dir: str, token_ids: np.ndarray) -> np.ndarray:
    config = ModelConfig.from_dir(model_dir)
    params = load_params(model_dir, config, jnp.float32)
    model = build_model(config, ReferenceBackend(), jnp.float32)
    t, bs = len(token_ids), 16
    num_blocks = -(-t // bs)
    caches = [(jnp.zeros((num_blocks + 1, bs, config.num_kv_heads, config.head_dim)),) * 2
              for _ in range(config.num_layers)]  # fmt: skip
    md = AttentionMetadata(
        slot_mapping=jnp.arange(t, dtype=jnp.int32) + bs,
        query_start_loc=jnp.array([0, t], jnp.int32),
        seq_lens=jnp.array([t], jnp.int32),
        block_tables=jnp.arange(1, num_blocks + 1, dtype=jnp.int32)[None],
        token_req_idx=jnp.zeros(t, jnp.int32),
    )
    with jax.default_matmul_precision("highest"):
        logits, _ = model.apply({"params": params}, jnp.asarray(token_ids),
                                jnp.arange(t, dtype=jnp.int32), caches, md)  # fmt: skip
    return np.asarray(logits)


def test_prefill_logits_match_transformers(converted):
    arch, hf_model, model_dir = converted
    ids = np.random.default_rng(0).integers(0, BASE["vocab_size"], 48).astype(np.int32)
    with torch.no_grad():
        want = hf_model(torch.tensor(ids)[None]).logits[0].numpy()
    got = _prefill_logits(model_dir, ids)
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    print(f"{arch}: prefill logits relative error {rel:.2e}")
    assert rel <= 1e-4


def test_greedy_continuation_is_token_identical(converted):
    arch, hf_model, model_dir = converted
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, BASE["vocab_size"], n).tolist() for n in (5, 23)]
    llm = LLM(model_dir, dtype="float32", max_model_len=128, max_num_seqs=4,
              max_num_batched_tokens=32, num_kv_blocks=24, show_progress=False)  # fmt: skip
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    outs = llm.generate([list(p) for p in prompts], params, use_tqdm=False)
    hf_model.generation_config.eos_token_id = None
    hf_model.generation_config.pad_token_id = 0
    for prompt, out in zip(prompts, outs, strict=True):
        with torch.no_grad():
            ref = hf_model.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False,
                                    min_new_tokens=32)  # fmt: skip
        assert out.outputs[0].token_ids == ref[0, len(prompt) :].tolist(), arch
