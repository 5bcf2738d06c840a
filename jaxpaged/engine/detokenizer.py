"""Incremental detokenization and stop strings, one `IncrementalDetokenizer` per sample.

Each step the output processor hands over the newly sampled token ids:

    token ids ──decode window──> new characters ──append──> output_text ──stop check──> truncate
                                                                 │
                           get_next_output_text(delta) <─────────┘ (minus the held-back tail)

Decoding a window, not single tokens: a token may hold half of a multi-byte UTF-8 character
(byte-level BPE, <0xNN> byte fallback), and SentencePiece-style decoders strip the leading
space of the first token they see. So we decode `token_ids[prefix_offset:]` and
`token_ids[prefix_offset:read_offset]` and emit the difference, as vLLM and TGI do. The window
starts a few tokens back in the prompt so that the first output token keeps its space. A
decode that ends in U+FFFD is an incomplete character: nothing is emitted until the next
token completes it (or the sample finishes, when it is flushed as is).
"""

from __future__ import annotations

from jaxpaged.sampling_params import SamplingParams

# Prompt tokens of context before the first output token (vLLM uses 5).
_PROMPT_CONTEXT_TOKENS = 6
_REPLACEMENT_CHAR = "\ufffd"


def check_stop_strings(
    output_text: str, new_char_count: int, stop: list[str], include_stop_str_in_output: bool
) -> tuple[str, int] | None:
    """Finds a stop string overlapping the last `new_char_count` characters.

    Returns (stop string, length to truncate the text to; -1 = keep all), or None. Only the
    new characters plus a window of len(stop) - 1 before them are searched: a match lying
    wholly in older text would have been found in an earlier step.
    """
    if not new_char_count or not stop:
        return None
    best: tuple[int, str] | None = None
    for stop_str in stop:
        start = max(0, len(output_text) - new_char_count - len(stop_str) + 1)
        index = output_text.find(stop_str, start)
        if index != -1 and (best is None or index < best[0]):
            best = (index, stop_str)
    if best is None:
        return None
    index, stop_str = best
    if include_stop_str_in_output:
        index += len(stop_str)
        if index >= len(output_text):
            return stop_str, -1
    return stop_str, index


def stop_holdback_len(text: str, stop: list[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string.

    Streaming must not emit those characters yet: the next token may complete the stop
    string, and then they are cut from the text.
    """
    longest = 0
    for stop_str in stop:
        for k in range(min(len(stop_str) - 1, len(text)), longest, -1):
            if text.endswith(stop_str[:k]):
                longest = k
                break
    return longest


class IncrementalDetokenizer:
    """Turns one sample's token stream into text, applying its stop strings."""

    def __init__(self, tokenizer, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = params.skip_special_tokens
        self.stop: list[str] = list(params.stop or [])
        self.include_stop_str_in_output = params.include_stop_str_in_output
        self.min_tokens = params.min_tokens
        context = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        self.token_ids: list[int] = context
        """The decode context: a few prompt tokens, then every output token."""
        self.prefix_offset = 0
        self.read_offset = len(context)
        self._prefix_text = self._decode(0, self.read_offset)
        self.num_output_tokens = 0
        self.output_text = ""
        self._sent_offset = 0
        """Characters of output_text already returned in delta mode."""

    def _decode(self, start: int, end: int) -> str:
        return self.tokenizer.decode(
            self.token_ids[start:end], skip_special_tokens=self.skip_special_tokens
        )

    def _decode_next(self, flush: bool) -> str:
        """Characters the tokens after read_offset add to the text ('' while incomplete)."""
        new_text = self._decode(self.prefix_offset, len(self.token_ids))
        if new_text.endswith(_REPLACEMENT_CHAR) and not flush:
            return ""
        prefix = self._prefix_text
        if not new_text.startswith(prefix):
            # The prompt context ended mid-character and this token completed it.
            common = 0
            while common < min(len(prefix), len(new_text)) and prefix[common] == new_text[common]:
                common += 1
            prefix = prefix[:common]
        delta = new_text[len(prefix) :]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.token_ids)
        self._prefix_text = self._decode(self.prefix_offset, self.read_offset)
        return delta

    def update(
        self, new_token_ids: list[int], finished: bool, skip_last: bool = False
    ) -> str | None:
        """Adds this step's tokens; returns the stop string that ended the sample, if any.

        `skip_last`: the last token is a stop token (EOS or stop_token_ids) that stays out of
        the text, as in vLLM, unless include_stop_str_in_output.
        """
        self.num_output_tokens += len(new_token_ids)
        if skip_last and not self.include_stop_str_in_output:
            new_token_ids = new_token_ids[:-1]
        new_chars = 0
        for i, token_id in enumerate(new_token_ids):
            self.token_ids.append(token_id)
            flush = finished and i == len(new_token_ids) - 1
            delta = self._decode_next(flush)
            self.output_text += delta
            new_chars += len(delta)
        if finished and self.read_offset < len(self.token_ids):
            delta = self._decode_next(flush=True)
            self.output_text += delta
            new_chars += len(delta)
        if self.stop and self.num_output_tokens > self.min_tokens:
            hit = check_stop_strings(
                self.output_text, new_chars, self.stop, self.include_stop_str_in_output
            )
            if hit is not None:
                stop_str, truncate_to = hit
                if truncate_to != -1:
                    self.output_text = self.output_text[:truncate_to]
                return stop_str
        return None

    def get_next_output_text(self, finished: bool, delta: bool) -> str:
        """The whole text (final mode) or what is new since the last call (delta mode)."""
        if not delta:
            return self.output_text
        holdback = 0
        if not finished and self.stop and not self.include_stop_str_in_output:
            holdback = stop_holdback_len(self.output_text, self.stop)
        end = len(self.output_text) - holdback
        if end <= self._sent_offset:
            return ""
        text = self.output_text[self._sent_offset : end]
        self._sent_offset = end
        return text
