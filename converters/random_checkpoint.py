"""Write a random Llama HF checkpoint of any size, for conversion benchmarks.

    python -m converters.random_checkpoint OUT_DIR --hidden 2048 --layers 16 \
        --intermediate 8192 --vocab 32000 --shard-gb 2

Tensors are generated one at a time with numpy and streamed into bf16 safetensors shards
(converters.safetensors_io.write_safetensors), so writing a multi-GB checkpoint needs
memory for one tensor only, and no torch.
"""

from __future__ import annotations

import argparse
import json
import os

import ml_dtypes
import numpy as np

from converters.safetensors_io import write_safetensors


def hf_config(args) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": args.vocab,
        "hidden_size": args.hidden,
        "intermediate_size": args.intermediate,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.kv_heads,
        "head_dim": args.hidden // args.heads,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }


def write_random_checkpoint(out_dir: str, args) -> None:
    from converters.hf import expected_hf_shapes
    from jaxpaged.config import ModelConfig

    os.makedirs(out_dir, exist_ok=True)
    config = hf_config(args)
    shapes = expected_hf_shapes(ModelConfig.from_hf_dict(config))
    bf16 = np.dtype(ml_dtypes.bfloat16)
    limit, shards, current, size = args.shard_gb * 2**30, [], {}, 0
    for name, shape in shapes.items():  # greedy packing in checkpoint order, like HF
        nbytes = int(np.prod(shape)) * 2
        if current and size + nbytes > limit:
            shards.append(current)
            current, size = {}, 0
        current[name] = (shape, bf16)
        size += nbytes
    shards.append(current)
    rng = np.random.default_rng(0)

    def make(name):
        shape = shapes[name]
        if name.endswith("norm.weight"):
            return np.ones(shape, bf16)
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(bf16)

    weight_map = {}
    for i, specs in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(os.path.join(out_dir, file), specs, make, {"format": "pt"})
        weight_map.update(dict.fromkeys(specs, file))
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--intermediate", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--shard-gb", type=float, default=2.0)
    args = parser.parse_args()
    write_random_checkpoint(args.out_dir, args)


if __name__ == "__main__":
    main()
