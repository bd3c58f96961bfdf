"""Per-request sampling settings, validated where they enter the engine."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from sluice.structured.spec import StructuredOutput

# Below this a temperature is greedy: dividing logits by it overflows float32 (vLLM does the same).
GREEDY_TEMPERATURE = 1e-5
_SEED_RANGE = 2**63  # seeds are int64s >= 0, as the API's `seed` is
_MAX_TOP_K = 2**31 - 1
# A repetition penalty divides or multiplies logits. Past these bounds it has long made the
# repeated tokens certain or impossible, and near 0 it underflows float32 (1e-40 becomes 0).
_REPETITION_PENALTY_RANGE = (0.01, 100.0)
_LOGIT_BIAS_RANGE = 100.0  # OpenAI's: -100 bans a token, +100 all but forces it


class InvalidParameterError(ValueError):
    """A request parameter is out of range; `param` names it (OpenAI's error `param`), `code`
    says what kind of error it is where clients look for one (`context_length_exceeded`)."""

    def __init__(self, param: str, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"  # OpenAI's code for a too long request


@dataclass
class SamplingParams:
    """What to generate and how. Defaults are greedy decoding of up to 16 tokens."""

    max_tokens: int = 16
    min_tokens: int = 0  # EOS and stop token ids are suppressed until this many tokens exist
    temperature: float = 0.0
    top_k: int = 0  # 0 or -1: no top-k cut
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    n: int = 1
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; k >= 0: chosen token plus top-k alternatives
    skip_special_tokens: bool = True
    # False: the engine proposes no draft tokens for this request (same output, its own pace).
    speculative: bool = True
    # Added to the logits before sampling (not to logprobs, which describe the model).
    logit_bias: dict[int, float] = field(default_factory=dict)
    structured: StructuredOutput | None = None  # what the output must match
    # Logprobs of each prompt token after the first, with this many alternatives.
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        self.stop = _as_list(self.stop, "stop", "a string or a list of strings")
        self.stop_token_ids = _as_list(self.stop_token_ids, "stop_token_ids", "a list of token ids")
        if self.top_k == -1:
            self.top_k = 0
        self.validate()
        if self.temperature < GREEDY_TEMPERATURE:
            self.temperature = 0.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def uses_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )

    def validate(self) -> None:
        checks: list[tuple[bool, str, str]] = [
            (_is_int(self.max_tokens) and self.max_tokens >= 1, "max_tokens", "must be >= 1"),
            (
                _is_int(self.min_tokens) and 0 <= self.min_tokens <= self.max_tokens,
                "min_tokens",
                "must be in [0, max_tokens]",
            ),
            (
                _finite(self.temperature) and self.temperature >= 0.0,
                "temperature",
                "must be a finite number >= 0",
            ),
            (0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]"),
            (
                _is_int(self.top_k) and 0 <= self.top_k <= _MAX_TOP_K,
                "top_k",
                "must be -1, 0 or a positive int32",
            ),
            (0.0 <= self.min_p <= 1.0, "min_p", "must be in [0, 1]"),
            (
                _finite(self.repetition_penalty)
                and _REPETITION_PENALTY_RANGE[0]
                <= self.repetition_penalty
                <= _REPETITION_PENALTY_RANGE[1],
                "repetition_penalty",
                "must be in [{}, {:g}]".format(*_REPETITION_PENALTY_RANGE),
            ),
            (-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", "must be in [-2, 2]"),
            (-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty", "must be in [-2, 2]"),
            (_is_int(self.n) and 1 <= self.n <= 128, "n", "must be in [1, 128]"),
            (
                self.logprobs is None or (_is_int(self.logprobs) and 0 <= self.logprobs <= 20),
                "logprobs",
                "must be in [0, 20]",
            ),
            (
                self.seed is None or (_is_int(self.seed) and 0 <= self.seed < _SEED_RANGE),
                "seed",
                f"must be an integer in [0, {_SEED_RANGE - 1}]",
            ),
            (
                self.prompt_logprobs is None
                or (_is_int(self.prompt_logprobs) and 0 <= self.prompt_logprobs <= 20),
                "prompt_logprobs",
                "must be in [0, 20]",
            ),
            (
                isinstance(self.logit_bias, dict)
                and all(
                    _is_int(t) and t >= 0 and _finite(b) and abs(b) <= _LOGIT_BIAS_RANGE
                    for t, b in self.logit_bias.items()
                ),
                "logit_bias",
                f"must map token ids to biases in [-{_LOGIT_BIAS_RANGE:g}, {_LOGIT_BIAS_RANGE:g}]",
            ),
            (all(isinstance(s, str) and s for s in self.stop), "stop", "must be non-empty strings"),
            (
                all(_is_int(t) and t >= 0 for t in self.stop_token_ids),
                "stop_token_ids",
                "must be token ids >= 0",
            ),
        ]
        for ok, param, why in checks:
            if not ok:
                raise InvalidParameterError(param, f"{param} {why}, got {getattr(self, param)!r}")

    def for_sample(self, index: int) -> SamplingParams:
        """The params of the index-th of `n` samples: one sequence each, distinct seeds (wrapping
        round, so that every valid seed has `n` valid successors)."""
        seed = None if self.seed is None else (self.seed + index) % _SEED_RANGE
        return SamplingParams(**{**self.__dict__, "n": 1, "seed": seed})


def _as_list(value: object, param: str, expected: str) -> list:
    """A list of the values given one (a str) or many; InvalidParameterError for anything else."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, (list, tuple)):
        raise InvalidParameterError(param, f"{param} must be {expected}, got {value!r}")
    return list(value)


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
