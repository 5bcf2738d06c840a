"""`jaxpaged generate`: stream generated text to the terminal as it is produced.

Requests go to the engine with output_kind='delta'; each step's new text is printed at once.
With several prompts, each one's text is printed under its own header when it finishes.
"""

from __future__ import annotations

import argparse
import sys
import time

from jaxpaged.llm import LLM
from jaxpaged.sampling_params import SamplingParams


def _sampling_params(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        stop=args.stop,
        seed=args.sampling_seed,
        output_kind="delta",
    )


def _build_llm(args: argparse.Namespace) -> LLM:
    return LLM(
        args.model,
        load_format=args.load_format,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        # Only as many sequences as prompts: fewer step buckets to compile at start-up.
        max_num_seqs=args.max_num_seqs or len(args.prompt),
        max_num_batched_tokens=args.max_num_batched_tokens,
        num_kv_blocks=args.num_kv_blocks,
        gpu_memory_utilization=args.gpu_memory_utilization,
        seed=args.seed,
    )


def run(args: argparse.Namespace) -> int:
    params = _sampling_params(args)
    llm = _build_llm(args)
    tok = llm.get_tokenizer()
    engine = llm.engine
    for i, prompt in enumerate(args.prompt):
        if args.chat:
            messages = [{"role": "user", "content": prompt}]
            prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            ids = tok.encode(prompt, add_special_tokens=False)
        else:
            ids = tok.encode(prompt)
        engine.add_request(str(i), prompt, ids, params)
    single = len(args.prompt) == 1
    texts = {str(i): "" for i in range(len(args.prompt))}
    start, num_tokens = time.perf_counter(), 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            delta = out.outputs[0].text
            num_tokens += len(out.outputs[0].token_ids)
            texts[out.request_id] += delta
            if single:
                sys.stdout.write(delta)
                sys.stdout.flush()
            elif out.finished:
                print(f"--- prompt {out.request_id}: {args.prompt[int(out.request_id)]!r}")
                print(texts[out.request_id])
    elapsed = time.perf_counter() - start
    print(f"\n[{num_tokens} tokens in {elapsed:.2f} s, {num_tokens / elapsed:.1f} tok/s]",
          file=sys.stderr)  # fmt: skip
    return 0
