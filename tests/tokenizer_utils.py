"""Tiny real Hugging Face tokenizers built locally (no model hub), for engine and server tests.

`build_byte_level_tokenizer()` trains a GPT-2 style byte-level BPE on a few sentences that
include multi-byte characters (accents, CJK, emoji), so single characters span several
tokens. `build_byte_fallback_tokenizer()` trains a Llama/SentencePiece style BPE (Metaspace
"▁" spaces, <0xNN> byte-fallback tokens). Both carry ChatML special tokens and SmolLM2's chat
template, and are cached per process because training takes ~100 ms.
"""

from __future__ import annotations

import functools
import json
import os

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# SmolLM2-Instruct's template (ChatML), shortened: no default system prompt.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! Hello there, how are you today?",
    "Paged attention stores the KV cache in fixed-size blocks.",
    "Café crème brûlée, naïve façade, jalapeño piñata.",
    "日本語のテキストと中文文本。",
    "Emoji: 🙂 🚀 🎉 and math: ∑ ∞ ≤ ≥ π.",
    "Stop strings like STOP or ### end the text; so does the end token.",
    "One two three four five six seven eight nine ten.",
    "def main():\n    print('hello')\n    return 0\n",
    "Ünïcödé ümläüts ßtraße Ωμέγα привет мир.",
]


def _wrap(tok: Tokenizer, **kwargs) -> PreTrainedTokenizerFast:
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        **kwargs,
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


@functools.cache
def build_byte_level_tokenizer(vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """GPT-2 style byte-level BPE: every byte is a token, so any text round-trips."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    return _wrap(tok)


@functools.cache
def build_byte_fallback_tokenizer(vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """Llama style: '▁' marks spaces, unknown characters fall back to <0xNN> byte tokens."""
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<|endoftext|>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = None
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
    )
    # Trained on ASCII only, so every other character falls back to its UTF-8 bytes.
    tok.train_from_iterator([s for s in CORPUS if s.isascii()] * 4, trainer=trainer)
    # The trainer cannot add the 256 <0xNN> tokens as ordinary tokens: splice them into the
    # vocabulary right after the special tokens, as Llama's tokenizer lays them out.
    spec = json.loads(tok.to_str())
    trained = sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])
    names = [t for t, _ in trained[: len(SPECIAL_TOKENS)]]
    names += [f"<0x{b:02X}>" for b in range(256)] + [t for t, _ in trained[len(SPECIAL_TOKENS) :]]
    spec["model"]["vocab"] = {t: i for i, t in enumerate(names)}
    spec["model"]["byte_fallback"] = True
    tok = Tokenizer.from_str(json.dumps(spec))
    return _wrap(tok)


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, path: str | os.PathLike) -> None:
    """Writes tokenizer.json + tokenizer_config.json (with the chat template) into `path`."""
    tokenizer.save_pretrained(str(path))
