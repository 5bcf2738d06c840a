"""The runner's persistent host-side batch: one slot per running request, in numpy.

A request keeps its slot from admission until it finishes or is preempted; the scheduler's
diffs (new requests, appended blocks, finished ids) update the slot arrays in place, and
`prepare` builds a step's padded inputs from them in one vectorized pass.
Under async scheduling a slot may have one token still on the device (`num_pending`):
`prepare` gives its position the token id -1, which the step replaces with the slot's last
sampled token on device.

    slots of the scheduled requests ──► token ids, positions, slot_mapping, block tables,
                                        query_start_loc, seq_lens, sampling rows
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from jaxpaged.engine.scheduler_output import NewRequestData
from jaxpaged.sampling_params import MAX_LOGIT_BIAS

# Stop ids suppressed while a request is under min_tokens share the logit-bias table.
MAX_SUPPRESSED_IDS = 32
BIAS_WIDTH = MAX_LOGIT_BIAS + MAX_SUPPRESSED_IDS


@dataclass
class HostStep:
    """A step's inputs, padded to the bucket (T tokens, R requests), as numpy arrays."""

    token_ids: np.ndarray  # i32[T]
    positions: np.ndarray  # i32[T]
    slot_mapping: np.ndarray  # i32[T]
    token_req_idx: np.ndarray  # i32[T]
    query_start_loc: np.ndarray  # i32[R + 1]
    seq_lens: np.ndarray  # i32[R]
    block_tables: np.ndarray  # i32[R, max_blocks]
    logits_indices: np.ndarray  # i32[R]
    sampling: dict[str, np.ndarray]  # the SamplingTensors fields, each [R] or [R, NB]
    num_reqs: int
    num_tokens: int


class InputBatch:
    def __init__(
        self, max_num_seqs: int, max_model_len: int, block_size: int, vocab_size: int
    ) -> None:
        self.max_num_seqs = max_num_seqs
        self.block_size = block_size
        self.vocab_size = vocab_size
        self.max_blocks = -(-max_model_len // block_size)
        n = max_num_seqs
        self.token_ids = np.zeros((n, max_model_len), np.int32)
        self.num_tokens = np.zeros(n, np.int32)
        self.num_prompt_tokens = np.zeros(n, np.int32)
        self.block_table = np.zeros((n, self.max_blocks), np.int32)
        self.num_blocks = np.zeros(n, np.int32)
        self.temperature = np.zeros(n, np.float32)
        self.top_k = np.zeros(n, np.int32)
        self.top_p = np.ones(n, np.float32)
        self.min_p = np.zeros(n, np.float32)
        self.presence = np.zeros(n, np.float32)
        self.frequency = np.zeros(n, np.float32)
        self.repetition = np.ones(n, np.float32)
        self.seeds = np.zeros(n, np.uint32)
        self.bias_ids = np.full((n, BIAS_WIDTH), vocab_size, np.int32)
        self.bias_vals = np.zeros((n, BIAS_WIDTH), np.float32)
        self.min_tokens = np.zeros(n, np.int32)
        self.logprobs = np.full(n, -1, np.int32)
        self.num_pending = np.zeros(n, np.int32)
        """Tokens sampled for the slot by a step whose result the host has not read yet."""
        self.slot_gen = np.zeros(n, np.int64)
        """Bumped when a slot is (re)assigned: a late result for its previous owner is dropped."""
        self.slot_of: dict[str, int] = {}
        self._free_slots = list(range(n - 1, -1, -1))

    def add(self, req: NewRequestData) -> int:
        slot = self._free_slots.pop()
        self.slot_of[req.req_id] = slot
        n = len(req.token_ids)
        self.token_ids[slot, :n] = req.token_ids
        self.num_tokens[slot] = n
        self.num_prompt_tokens[slot] = req.num_prompt_tokens
        self.num_blocks[slot] = 0
        self.num_pending[slot] = 0
        self.slot_gen[slot] += 1
        self.append_blocks(slot, req.block_ids)
        sp = req.sampling_params
        self.temperature[slot] = sp.temperature
        self.top_k[slot] = sp.top_k
        self.top_p[slot] = sp.top_p
        self.min_p[slot] = sp.min_p
        self.presence[slot] = sp.presence_penalty
        self.frequency[slot] = sp.frequency_penalty
        self.repetition[slot] = sp.repetition_penalty
        self.seeds[slot] = req.seed & 0xFFFFFFFF
        self.min_tokens[slot] = sp.min_tokens
        self.logprobs[slot] = -1 if sp.logprobs is None else sp.logprobs
        self.bias_ids[slot] = self.vocab_size
        self.bias_vals[slot] = 0.0
        for j, (tok, val) in enumerate((sp.logit_bias or {}).items()):
            if 0 <= tok < self.vocab_size:
                self.bias_ids[slot, j], self.bias_vals[slot, j] = tok, val
        stop_ids = sorted(sp.all_stop_token_ids)[:MAX_SUPPRESSED_IDS]
        self.bias_ids[slot, MAX_LOGIT_BIAS : MAX_LOGIT_BIAS + len(stop_ids)] = stop_ids
        return slot

    def remove(self, req_id: str) -> None:
        slot = self.slot_of.pop(req_id, None)
        if slot is not None:
            self.slot_gen[slot] += 1
            self._free_slots.append(slot)

    def append_blocks(self, slot: int, block_ids: list[int]) -> None:
        start = self.num_blocks[slot]
        self.block_table[slot, start : start + len(block_ids)] = block_ids
        self.num_blocks[slot] = start + len(block_ids)

    def append_tokens(self, slots: np.ndarray, token_ids: np.ndarray) -> None:
        """Each slot's sampled token, after its known tokens; the slots are distinct."""
        self.token_ids[slots, self.num_tokens[slots]] = token_ids
        self.num_tokens[slots] += 1

    def prepare(
        self,
        slots: np.ndarray,  # i32[num_reqs]
        starts: np.ndarray,  # i32[num_reqs]: num_computed_tokens
        counts: np.ndarray,  # i32[num_reqs]: tokens scheduled
        num_tokens_padded: int,
        num_reqs_padded: int,
    ) -> HostStep:
        r, t = len(slots), int(counts.sum())
        qsl = np.zeros(num_reqs_padded + 1, np.int32)
        np.cumsum(counts, out=qsl[1 : r + 1])
        qsl[r + 1 :] = t
        req_of_token = np.repeat(np.arange(r, dtype=np.int32), counts)
        pos = np.arange(t, dtype=np.int32) - np.repeat(qsl[:r], counts) + starts[req_of_token]
        tok_slot = slots[req_of_token]
        pad_t = num_tokens_padded - t
        bs = self.block_size
        slot_mapping = self.block_table[tok_slot, pos // bs] * bs + pos % bs
        seq_lens = np.zeros(num_reqs_padded, np.int32)
        seq_lens[:r] = starts + counts
        block_tables = np.zeros((num_reqs_padded, self.max_blocks), np.int32)
        block_tables[:r] = self.block_table[slots]
        logits_indices = np.zeros(num_reqs_padded, np.int32)
        logits_indices[:r] = qsl[1 : r + 1] - 1
        # A position past the host's tokens holds the slot's token still on the device.
        token_ids = np.where(pos < self.num_tokens[tok_slot], self.token_ids[tok_slot, pos], -1)
        return HostStep(
            token_ids=_pad(token_ids.astype(np.int32, copy=False), pad_t),
            positions=_pad(pos, pad_t),
            slot_mapping=_pad(slot_mapping, pad_t),
            # Padding tokens belong to the last (padding or real) row; their output is unused.
            token_req_idx=_pad(req_of_token, pad_t, num_reqs_padded - 1),
            query_start_loc=qsl,
            seq_lens=seq_lens,
            block_tables=block_tables,
            logits_indices=logits_indices,
            sampling=self._sampling_rows(slots, seq_lens[:r], num_reqs_padded),
            num_reqs=r,
            num_tokens=t,
        )

    def _sampling_rows(self, slots, seq_lens, num_reqs_padded) -> dict[str, np.ndarray]:
        r = len(slots)
        num_known = self.num_tokens[slots] + self.num_pending[slots]
        sample_mask = seq_lens == num_known
        # min_tokens: the stop ids' bias is -inf until enough tokens were generated.
        num_out = num_known - self.num_prompt_tokens[slots]
        under = num_out < self.min_tokens[slots]
        bias_vals = self.bias_vals[slots]  # fancy indexing copies: the slots stay as they are
        bias_vals[under, MAX_LOGIT_BIAS:] = -np.inf
        bias_ids = self.bias_ids[slots]
        bias_ids[~under, MAX_LOGIT_BIAS:] = self.vocab_size
        rows = {
            "temperature": self.temperature[slots],
            "top_k": self.top_k[slots],
            "top_p": self.top_p[slots],
            "min_p": self.min_p[slots],
            "presence_penalty": self.presence[slots],
            "frequency_penalty": self.frequency[slots],
            "repetition_penalty": self.repetition[slots],
            "seeds": self.seeds[slots],
            "positions": seq_lens.astype(np.int32),
            "bias_ids": bias_ids,
            "bias_vals": bias_vals,
            "slots": slots.astype(np.int32),
            "sample_mask": sample_mask,
        }
        fill = {"top_p": 1.0, "repetition_penalty": 1.0, "bias_ids": self.vocab_size,
                "slots": self.max_num_seqs}  # fmt: skip
        pad = num_reqs_padded - r
        return {k: _pad(v, pad, fill.get(k, 0)) for k, v in rows.items()}


def _pad(a: np.ndarray, n: int, value=0) -> np.ndarray:
    if n == 0:
        return a
    return np.concatenate([a, np.full((n, *a.shape[1:]), value, a.dtype)])
