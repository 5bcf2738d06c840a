"""Tiny random HF checkpoints (written by transformers) shared by the converter tests."""

from __future__ import annotations

import pytest

TINY = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=160,
    max_position_embeddings=256,
)


def make_hf_checkpoint(path, family: str, tie: bool = False, max_shard_size=None) -> str:
    """save_pretrained a randomly initialised tiny model of `family` into `path`."""
    import torch
    import transformers as tf

    classes = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
    }
    config_cls, model_cls = classes[family]
    # Qwen3 decouples head_dim from hidden / heads; 32 != 64 / 4 catches code that assumes it.
    extra = {"head_dim": 32} if family == "qwen3" else {}
    config = config_cls(**TINY, tie_word_embeddings=tie, **extra)
    torch.manual_seed(0)
    model = model_cls(config)
    with torch.no_grad():  # norms init to 1; randomise them so a swapped norm shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.normal_(1.0 if "norm" in name else 0.0, 0.1)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(path), safe_serialization=True, **kwargs)
    return str(path)


@pytest.fixture(scope="session")
def hf_dirs(tmp_path_factory):
    """family -> checkpoint dir: untied sharded llama, qwen2 (biases), tied qwen3, mistral."""
    root = tmp_path_factory.mktemp("hf")
    return {
        "llama": make_hf_checkpoint(root / "llama", "llama", max_shard_size="50KB"),
        "mistral": make_hf_checkpoint(root / "mistral", "mistral"),
        "qwen2": make_hf_checkpoint(root / "qwen2", "qwen2", tie=True),
        "qwen3": make_hf_checkpoint(root / "qwen3", "qwen3", tie=True),
    }
