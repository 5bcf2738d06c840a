"""The real bundled SmolLM2-135M-Instruct: jaxpaged's next-token choice matches transformers.

Eight chat prompts go through the paged reference path as ONE ragged batch (each prompt in
its own blocks, fragmented), and the top-1 next token of each must equal transformers'.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as tf

from jaxpaged.attention.metadata import AttentionMetadata
from jaxpaged.attention.reference import ReferenceBackend
from jaxpaged.config import ModelConfig
from jaxpaged.default_model import default_model_path
from jaxpaged.models.llama import build_model
from jaxpaged.models.loader import load_params

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "How many legs does a spider have?",
    "Translate 'good morning' into Spanish.",
    "What is 12 times 12?",
    "Name a famous physicist.",
    "Give me one tip for sleeping better.",
    "What color is the sky on a clear day?",
]


@pytest.fixture(scope="module")
def smollm2():
    path = default_model_path(progress=False)
    tok = tf.AutoTokenizer.from_pretrained(path)
    prompts = [
        tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
        for q in QUESTIONS
    ]
    prompts = [p if isinstance(p, list) else p["input_ids"] for p in prompts]
    return path, prompts


def test_top1_next_token_matches_transformers(smollm2):
    path, prompts = smollm2
    hf = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        want = [int(hf(torch.tensor([p])).logits[0, -1].argmax()) for p in prompts]

    config = ModelConfig.from_dir(path)
    params = load_params(path, config, jnp.float32)
    bs = 16
    lens = np.array([len(p) for p in prompts])
    blocks = -(-lens // bs)
    # Fragmented block tables: a shuffled pool, handed out request by request.
    pool = np.random.default_rng(0).permutation(np.arange(1, blocks.sum() + 1))
    width = blocks.max()
    tables = np.zeros((len(prompts), width), np.int32)
    slot_mapping, start = [], 0
    for r, n in enumerate(blocks):
        tables[r, :n] = pool[start : start + n]
        start += n
        pos = np.arange(lens[r])
        slot_mapping.append(tables[r, pos // bs] * bs + pos % bs)
    md = AttentionMetadata(
        slot_mapping=jnp.asarray(np.concatenate(slot_mapping), jnp.int32),
        query_start_loc=jnp.asarray(np.concatenate([[0], np.cumsum(lens)]), jnp.int32),
        seq_lens=jnp.asarray(lens, jnp.int32),
        block_tables=jnp.asarray(tables),
        token_req_idx=jnp.asarray(np.repeat(np.arange(len(prompts)), lens), jnp.int32),
    )
    caches = [(jnp.zeros((blocks.sum() + 1, bs, config.num_kv_heads, config.head_dim)),) * 2
              for _ in range(config.num_layers)]  # fmt: skip
    token_ids = jnp.asarray(np.concatenate(prompts), jnp.int32)
    positions = jnp.asarray(np.concatenate([np.arange(n) for n in lens]), jnp.int32)
    model = build_model(config, ReferenceBackend(), jnp.float32)
    logits, _ = jax.jit(model.apply)(
        {"params": params}, token_ids, positions, caches, md, md.query_start_loc[1:] - 1
    )
    got = np.asarray(logits).argmax(-1).tolist()
    assert got == want
