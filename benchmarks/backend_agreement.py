"""Greedy agreement of the Pallas backend with the reference backend, end to end on a GPU.

    python benchmarks/backend_agreement.py --out $OUT [--smoke]

Both engines get the same random weights (a Llama-3-style attention shape: head_dim 128,
GQA 4) and the same prompts, with greedy decoding and logprobs=2. Only the lm_head is
scaled up from the dummy init, so logits are peaked rather than near-ties. (Scaling every
weight x3 made the 8-layer body amplify bf16 rounding chaotically: reference vs a
reference with bf16-rounded attention weights then disagreed on 28-29 of 32 sequences too.)
Measure: a sequence agrees if it is token-identical, or if at its first differing position
the reference's top-2 logprob margin is below MARGIN (a near-tie that bf16 rounding may
flip). Reported: identical sequences, near-tie divergences, and real disagreements (which
must be zero).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxpaged.llm import LLM  # noqa: E402
from jaxpaged.sampling_params import SamplingParams  # noqa: E402

MARGIN = 0.05  # nats; bf16 logits carry ~3 significant digits
LM_HEAD_SCALE = 5.0  # logits std ~3: top-2 margins ~0.7 nats, far above bf16 noise
CONFIG = dict(model_type="llama", vocab_size=32000, hidden_size=1024, intermediate_size=2816,
              num_hidden_layers=8, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
              max_position_embeddings=4096, rope_theta=500000.0, rms_norm_eps=1e-5)  # fmt: skip


def _engine(path: str, backend: str, smoke: bool) -> LLM:
    # Two engines share the GPU: explicit pools (~2 GiB each) rather than memory fractions.
    kw = dict(max_model_len=2048, max_num_seqs=32, max_num_batched_tokens=512, num_kv_blocks=4096)
    if smoke:
        kw = dict(max_model_len=256, max_num_seqs=4, max_num_batched_tokens=64, num_kv_blocks=80)
    llm = LLM(path, load_format="dummy", attention_backend=backend, dtype="bfloat16",
              show_progress=False, **kw)  # fmt: skip
    # A sharper lm_head: greedy choices far from ties, without amplifying the body.
    params = dict(llm.model_runner.params)
    params["lm_head"] = {"kernel": params["lm_head"]["kernel"] * LM_HEAD_SCALE}
    llm.model_runner.params = params
    return llm


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--smoke", action="store_true", help="tiny shapes; pallas in interpret mode")
    args = ap.parse_args()
    cfg = dict(CONFIG)
    if args.smoke:
        cfg.update(num_hidden_layers=2, hidden_size=128, intermediate_size=256, vocab_size=512,
                   num_attention_heads=4, num_key_value_heads=1, head_dim=64)  # fmt: skip
    path = tempfile.mkdtemp()
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    rng = np.random.default_rng(0)
    lengths = [5, 17, 64, 130, 300, 511, 900, 33] * (1 if args.smoke else 4)
    if args.smoke:
        lengths = [min(n, 100) for n in lengths]
    prompts = [rng.integers(0, cfg["vocab_size"], n).tolist() for n in lengths]
    params = SamplingParams(temperature=0.0, max_tokens=16 if args.smoke else 64,
                            ignore_eos=True, logprobs=2)  # fmt: skip
    ref = _engine(path, "reference", args.smoke).generate(prompts, params, use_tqdm=False)
    got = _engine(path, "pallas", args.smoke).generate(prompts, params, use_tqdm=False)
    identical, near_tie, disagree, first_diff = 0, 0, 0, []
    for r, g in zip(ref, got, strict=True):
        a, b = r.outputs[0].token_ids, g.outputs[0].token_ids
        if a == b:
            identical += 1
            continue
        i = next(k for k in range(len(a)) if a[k] != b[k])
        lps = sorted((lp.logprob for lp in r.outputs[0].logprobs[i].values()), reverse=True)
        margin = lps[0] - lps[1]
        first_diff.append((i, margin))
        if margin < MARGIN:
            near_tie += 1
        else:
            disagree += 1
    result = {"sequences": len(ref), "tokens_each": params.max_tokens, "identical": identical,
              "near_tie_divergences": near_tie, "disagreements": disagree,
              "first_diff_and_margin": first_diff, "margin_bound_nats": MARGIN,
              "device": str(jax.devices()[0])}  # fmt: skip
    print(json.dumps(result))
    with open(os.path.join(args.out, "agreement.json"), "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
