"""Per-request sampling settings, with vLLM's names and defaults.

`SamplingParams` is validated on construction, so a bad value fails where the user made it,
with a message that names the value and the allowed range. The server maps these
`ValueError`s to OpenAI 400 errors.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

# Most logprobs one request may ask for (vLLM's default `max_logprobs`). The device step
# always computes this many top candidates, so it is fixed at compile time.
MAX_LOGPROBS = 20
# Most `logit_bias` entries per request; the step carries them as a fixed-width sparse table.
MAX_LOGIT_BIAS = 128
_EPS = 1e-5


@dataclass
class SamplingParams:
    n: int = 1
    """Number of output sequences to return for the prompt."""
    temperature: float = 1.0
    """0 means greedy."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability sums to >= top_p."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 or -1 keeps all."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times the top token's."""
    presence_penalty: float = 0.0
    """Subtracted from the logit of every token generated so far."""
    frequency_penalty: float = 0.0
    """Subtracted from a token's logit once per time it was generated so far."""
    repetition_penalty: float = 1.0
    """Divides positive (multiplies negative) logits of tokens in the prompt or output."""
    logit_bias: dict[int, float] | None = None
    """Token id -> value added to that token's logit."""
    seed: int | None = None
    """Seed of this request's own random stream; None draws one from the engine."""
    stop: str | list[str] | None = None
    """Strings that end generation; excluded from the text unless include_stop_str_in_output."""
    stop_token_ids: list[int] | None = None
    """Token ids that end generation, besides EOS."""
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    """Keep generating after EOS (benchmarks)."""
    max_tokens: int | None = 16
    """Most tokens to generate; None means up to max_model_len."""
    min_tokens: int = 0
    """EOS and stop token ids are suppressed until this many tokens exist."""
    logprobs: int | None = None
    """Return this many top logprobs per generated token, plus the sampled one."""
    prompt_logprobs: int | None = None
    """Not supported yet; must be None."""
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    detokenize: bool = True
    output_kind: str = "final"
    """'final' returns one output per request; 'delta' returns new tokens each step (server)."""
    _all_stop_token_ids: set[int] = field(default_factory=set, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}.")
        if self.temperature < _EPS:
            # Greedy: the other sampling knobs have no effect, as in vLLM.
            self.temperature = 0.0
            self.top_p, self.top_k, self.min_p = 1.0, 0, 0.0
        self._validate()
        self._all_stop_token_ids = set(self.stop_token_ids)

    def _validate(self) -> None:
        def bad(name: str, value, rule: str) -> ValueError:
            return ValueError(f"{name} must be {rule}, got {value!r}.")

        if self.n < 1:
            raise bad("n", self.n, ">= 1")
        if self.temperature < 0:
            raise bad("temperature", self.temperature, ">= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", self.top_p, "in (0, 1]")
        if self.top_k < 0:
            raise bad("top_k", self.top_k, "-1, 0 (all) or a positive integer")
        if not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", self.min_p, "in [0, 1]")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise bad("presence_penalty", self.presence_penalty, "in [-2, 2]")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise bad("frequency_penalty", self.frequency_penalty, "in [-2, 2]")
        if self.repetition_penalty <= 0:
            raise bad("repetition_penalty", self.repetition_penalty, "> 0")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise bad("max_tokens", self.max_tokens, ">= 1")
        if self.min_tokens < 0:
            raise bad("min_tokens", self.min_tokens, ">= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})."
            )
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise bad("logprobs", self.logprobs, f"in [0, {MAX_LOGPROBS}]")
        if self.prompt_logprobs is not None:
            raise ValueError("prompt_logprobs is not supported yet.")
        if self.logit_bias:
            if len(self.logit_bias) > MAX_LOGIT_BIAS:
                raise ValueError(
                    f"logit_bias has {len(self.logit_bias)} entries; at most "
                    f"{MAX_LOGIT_BIAS} are supported."
                )
            self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty.")
        if self.output_kind not in ("final", "delta"):
            raise bad("output_kind", self.output_kind, "'final' or 'delta'")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
        )

    @property
    def all_stop_token_ids(self) -> set[int]:
        """stop_token_ids plus the model's EOS ids (filled in by the engine)."""
        return self._all_stop_token_ids

    def update_from_generation_config(self, eos_token_ids: set[int]) -> None:
        if not self.ignore_eos:
            self._all_stop_token_ids = set(self.stop_token_ids) | set(eos_token_ids)

    def clone(self) -> SamplingParams:
        """A copy whose containers (stop, stop_token_ids, logit_bias, the stop id set) are
        its own. Their items are immutable, so this equals a deep copy at a fraction of its
        cost (the engine clones twice per request)."""
        new = copy.copy(self)
        for name, value in vars(self).items():
            if isinstance(value, list | dict | set):
                setattr(new, name, value.copy())
        return new
