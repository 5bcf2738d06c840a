"""On-device sampling, inside the jitted step.

    logits f32[R, V]
      -> raw logprobs (what `logprobs` reports, as vLLM's default)
      -> penalties (repetition, frequency, presence) from per-slot token counts
      -> logit_bias and min_tokens suppression (sparse per-row tables)
      -> greedy rows: argmax | sampled rows: temperature, min_p, top_k, top_p, Gumbel-max

Randomness is per request: the noise is a hash of (seed, position of the new token, token
id), so a request's samples do not depend on its batch-mates or on the bucket it landed in.

No `lax.cond`: XLA:GPU runs a conditional by copying its predicate to the host and waiting
for the device there, which held the host for most of every step (4.1 of 5.7 ms at batch 1
on the 8B shape, docs/benchmarks.md), so it could never enqueue the next step early. The two
expensive parts, the sort behind top-k/top-p/min-p and the top logprobs, are compiled in or
out by a static `SamplerMode` that the host picks from the batch's sampling parameters, and
so are the penalties and logit bias (`adjust`): their per-slot token counts are an i32[R, V]
gather and a scatter each step (at 256 rows and a 152k vocabulary, 0.2 GB read), which a batch
without penalties, logit_bias or min_tokens skips. A request's counts are only read in steps
where it samples, which are steps in `adjust` mode, so updating them only in that mode keeps
them exact. The Gumbel noise is elementwise over [R, V] and always runs, zeroed for greedy
rows, so that one argmax serves greedy and sampled rows alike.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from jaxpaged.sampling_params import MAX_LOGPROBS

_NEG_INF = -jnp.inf


@dataclass(frozen=True)
class SamplerMode:
    """What a step's sampler is compiled with (a static argument)."""

    filters: bool = False  # some row has top_k, top_p or min_p set: sort the logits
    logprobs: bool = False  # some row asked for logprobs: top-k of the log-softmax
    adjust: bool = False  # some row has penalties, logit_bias or min_tokens suppression

    @classmethod
    def for_rows(cls, rows: Mapping[str, np.ndarray], want_logprobs: bool,
                 vocab_size: int) -> SamplerMode:  # fmt: skip
        """The mode that the sampling rows need: `rows` maps SamplingTensors' field names
        (top_k, top_p, min_p, the three penalties, bias_ids) to numpy arrays of those rows."""
        filters = (rows["top_k"] > 0) | (rows["top_p"] < 1) | (rows["min_p"] > 0)
        adjust = (
            (rows["presence_penalty"] != 0)
            | (rows["frequency_penalty"] != 0)
            | (rows["repetition_penalty"] != 1)
            | (rows["bias_ids"] < vocab_size).any(axis=-1)
        )
        return cls(bool(filters.any()), bool(want_logprobs), bool(adjust.any()))

    def compiled(self) -> SamplerMode:
        """The compiled mode that runs this one: itself, or with adjust on (a superset; a
        mode only adds work, so a superset samples exactly the same tokens)."""
        return self if self in ALL_MODES else dataclasses.replace(self, adjust=True)


MODE_FIELDS = ("top_k", "top_p", "min_p", "presence_penalty", "frequency_penalty",
               "repetition_penalty", "bias_ids")  # fmt: skip
"""The SamplingTensors fields that SamplerMode.for_rows reads."""

# Compiled: every (filters, logprobs) combination with adjust on, and without it the plain
# and filters-only modes (no penalties, bias or logprobs: the usual request); 6 per sampler
# signature rather than 8, which start-up compiles.
ALL_MODES = (SamplerMode(), SamplerMode(filters=True)) + tuple(
    SamplerMode(f, lp, adjust=True) for f, lp in itertools.product((False, True), repeat=2)
)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class SamplingTensors:
    temperature: jax.Array  # f32[R]; 0 = greedy
    top_k: jax.Array  # i32[R]; 0 = off
    top_p: jax.Array  # f32[R]; 1 = off
    min_p: jax.Array  # f32[R]; 0 = off
    presence_penalty: jax.Array  # f32[R]
    frequency_penalty: jax.Array  # f32[R]
    repetition_penalty: jax.Array  # f32[R]; 1 = off
    seeds: jax.Array  # u32[R]
    positions: jax.Array  # i32[R]: position of the token being sampled
    bias_ids: jax.Array  # i32[R, NB]: logit_bias and suppressed ids; V (out of range) = unused
    bias_vals: jax.Array  # f32[R, NB]
    slots: jax.Array  # i32[R]: rows of the per-slot penalty state
    sample_mask: jax.Array  # bool[R]: the row samples a real token this step


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class PenaltyState:
    """Per-slot token statistics, updated in place on device every step."""

    output_counts: jax.Array  # i32[num_slots, V]: times each token was generated
    prompt_mask: jax.Array  # bool[num_slots, V]: token occurs in the prompt


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class SamplerOutput:
    sampled: jax.Array  # i32[R]
    sampled_logprob: jax.Array  # f32[R]
    sampled_rank: jax.Array  # i32[R]: 1 = most likely
    top_ids: jax.Array  # i32[R, MAX_LOGPROBS]
    top_logprobs: jax.Array  # f32[R, MAX_LOGPROBS]


def apply_penalties(logits, counts, prompt_mask, presence, frequency, repetition):
    """vLLM's definitions. logits f32[R, V], counts i32[R, V], prompt_mask bool[R, V]."""
    seen = (counts > 0) | prompt_mask
    rep = repetition[:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    logits = logits - frequency[:, None] * counts.astype(logits.dtype)
    return logits - presence[:, None] * (counts > 0).astype(logits.dtype)


def apply_filters(logits, top_k, top_p, min_p):
    """Temperature-scaled logits f32[R, V] with min_p, then top_k, then top_p applied
    (top_p on the distribution that top_k left, as vLLM)."""
    v = logits.shape[-1]
    max_logit = logits.max(-1, keepdims=True)
    logits = jnp.where(logits < max_logit + jnp.log(min_p[:, None]), _NEG_INF, logits)
    desc = -jnp.sort(-logits, axis=-1)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
    in_top_k = jnp.arange(v)[None, :] < k[:, None]
    desc = jnp.where(in_top_k, desc, _NEG_INF)
    probs = jax.nn.softmax(desc, axis=-1)
    # in_top_k too: the cumulative sum can round below top_p = 1 over the masked tail.
    keep = ((jnp.cumsum(probs, axis=-1) - probs) < top_p[:, None]) & in_top_k
    num_keep = jnp.maximum(keep.sum(-1), 1)
    threshold = jnp.take_along_axis(desc, (num_keep - 1)[:, None], axis=-1)
    return jnp.where(logits >= threshold, logits, _NEG_INF)


def _mix32(x):
    """lowbias32 (C. Wellons): a full-avalanche 32-bit integer mixer."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def gumbel_noise(seeds, positions, vocab_size):
    """f32[R, V] Gumbel noise that depends only on (seed, position, token id).

    A counter-based hash rather than jax.random: threefry under vmap cost ~1.5 s of compile
    per bucket on CPU and R x V threefry rounds per step; the property that matters, a
    request's stream keyed by its seed and the sampled position, is the same."""
    row = _mix32(_mix32(seeds.astype(jnp.uint32) ^ jnp.uint32(0x9E3779B9))
                 ^ positions.astype(jnp.uint32))  # fmt: skip
    tok = jnp.arange(vocab_size, dtype=jnp.uint32) * jnp.uint32(0x85EBCA6B)
    bits = _mix32(_mix32(row[:, None] ^ tok[None, :]) + jnp.uint32(0xC2B2AE35))
    u = (bits >> 8).astype(jnp.float32) * (1.0 / (1 << 24)) + (0.5 / (1 << 24))  # (0, 1)
    return -jnp.log(-jnp.log(u))


def _top_logprobs(logprobs, sampled):
    top_vals, top_ids = jax.lax.top_k(logprobs, MAX_LOGPROBS)
    chosen = jnp.take_along_axis(logprobs, sampled[:, None], axis=-1)[:, 0]
    rank = (logprobs > chosen[:, None]).sum(-1).astype(jnp.int32) + 1
    return chosen, rank, top_ids.astype(jnp.int32), top_vals


def sample(
    logits: jax.Array,  # f32[R, V]
    st: SamplingTensors,
    state: PenaltyState,
    mode: SamplerMode,  # static
) -> tuple[SamplerOutput, PenaltyState]:
    r, v = logits.shape
    raw = logits
    if mode.adjust:
        logits = apply_penalties(
            logits,
            state.output_counts[st.slots],
            state.prompt_mask[st.slots],
            st.presence_penalty,
            st.frequency_penalty,
            st.repetition_penalty,
        )
        rows = jnp.broadcast_to(jnp.arange(r)[:, None], st.bias_ids.shape)
        logits = logits.at[rows, st.bias_ids].add(st.bias_vals, mode="drop")
    greedy = st.temperature == 0
    scaled = logits / jnp.where(greedy, 1.0, st.temperature)[:, None]
    if mode.filters:
        # A greedy row keeps every entry equal to its maximum (min_p <= 1, top_k >= 1 and
        # top_p keep the top token and its ties), so its argmax is the unfiltered one.
        scaled = apply_filters(scaled, st.top_k, st.top_p, st.min_p)
    noise = jnp.where(greedy[:, None], 0.0, gumbel_noise(st.seeds, st.positions, v))
    sampled = jnp.argmax(scaled + noise, axis=-1).astype(jnp.int32)
    if mode.logprobs:
        lp = _top_logprobs(jax.nn.log_softmax(raw, axis=-1), sampled)
    else:
        lp = (
            jnp.zeros((r,), jnp.float32),
            jnp.zeros((r,), jnp.int32),
            jnp.zeros((r, MAX_LOGPROBS), jnp.int32),
            jnp.zeros((r, MAX_LOGPROBS), jnp.float32),
        )
    counts = state.output_counts
    if mode.adjust:
        counts = counts.at[st.slots, sampled].add(st.sample_mask.astype(jnp.int32))
    new_state = PenaltyState(counts, state.prompt_mask)
    return SamplerOutput(sampled, *lp), new_state


def init_penalty_row(
    state: PenaltyState,
    slot: jax.Array,  # i32[]
    token_ids: jax.Array,  # i32[L]: the request's tokens so far, padded with -1
    num_prompt_tokens: jax.Array,  # i32[]
) -> PenaltyState:
    """Reset one slot's statistics for a request that (re)enters the batch."""
    v = state.output_counts.shape[1]
    idx = jnp.arange(token_ids.shape[0])
    ids = jnp.where(token_ids >= 0, token_ids, v)  # padding -> dropped
    is_output = (idx >= num_prompt_tokens).astype(jnp.int32)
    counts = jnp.zeros((v,), jnp.int32).at[ids].add(is_output, mode="drop")
    mask = jnp.zeros((v,), jnp.bool_).at[jnp.where(is_output == 0, ids, v)].set(True, mode="drop")
    return PenaltyState(
        state.output_counts.at[slot].set(counts), state.prompt_mask.at[slot].set(mask)
    )
