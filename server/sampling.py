"""SamplingParams (validated, with messages that say what is allowed) and the batched sampler.

The sampler turns a [B, V] float32 logits batch into one token per row. Every row draws its noise from
its own torch.Generator, so a seeded request gives the same tokens whatever else is in the batch.
"""
import math
from dataclasses import dataclass, field

import torch

MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 16          # stop strings per request
MAX_STOP_STRING_CHARS = 256    # characters in one stop string
MAX_STOP_TOKEN_IDS = 64
MAX_LOGIT_BIAS = 300           # token ids in logit_bias, as OpenAI allows
MAX_GRAMMAR_CHARS = 256 * 1024  # a structured-output spec's text (a JSON schema, regex, choice list or grammar)
GRAMMAR_KINDS = ("json", "regex", "choice", "grammar")
ANY_OBJECT_SCHEMA = '{"type": "object"}'   # the "json" spec of OpenAI's json_object: any JSON object
_GREEDY_EPS = 1e-5


class InvalidRequestError(ValueError):
    """A request the engine refuses; frontends answer 400 / INVALID_ARGUMENT with its message."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass
class StructuredOutput:
    """A grammar the output must follow: kind "json" (spec: a JSON schema's text; ANY_OBJECT_SCHEMA for any
    object), "regex", "choice" (spec: a JSON list of strings) or "grammar" (a Lark grammar, or llama.cpp's GBNF).
    field names the request field it came from, in error messages."""
    kind: str
    spec: str
    field: str = "structured_output"
    start_after: int | None = None     # the grammar applies only after this token (a reasoning model's </think>)

    def __post_init__(self):
        _check(isinstance(self.field, str) and 0 < len(self.field) <= 64, "structured_output",
               "structured_output.field must be a short string")
        _check(self.start_after is None or _is_int(self.start_after) and 0 <= self.start_after < 2**31,
               "structured_output", "structured_output.start_after must be a token id")
        _check(self.kind in GRAMMAR_KINDS, self.field,
               f"{self.field}: the kind must be one of {', '.join(GRAMMAR_KINDS)}; got {str(self.kind)[:40]!r}")
        _check(isinstance(self.spec, str) and self.spec.strip() != "", self.field,
               f"{self.field} must be a non-empty string")
        _check(len(self.spec) <= MAX_GRAMMAR_CHARS, self.field,
               f"{self.field} is {len(self.spec)} characters; at most {MAX_GRAMMAR_CHARS} are allowed")


@dataclass
class SamplingParams:
    max_tokens: int | None = 16         # None: up to the context length
    temperature: float = 1.0            # 0 is greedy
    top_p: float = 1.0
    top_k: int = -1                     # -1 (or 0): all tokens
    min_p: float = 0.0
    repetition_penalty: float = 1.0     # > 1 discourages tokens seen in prompt or output (HF semantics)
    presence_penalty: float = 0.0       # OpenAI semantics, over output tokens
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: int | None = None         # return the sampled token's logprob and this many top alternatives
    prompt_logprobs: int | None = None  # the same for every prompt token (such requests skip the prefix cache)
    logit_bias: dict[int, float] = field(default_factory=dict)
    skip_special_tokens: bool = True
    structured_output: StructuredOutput | None = None   # the grammar every output token must follow

    def __post_init__(self):
        if isinstance(self.structured_output, dict):
            fields = {"kind", "spec", "field", "start_after"}
            _check(set(self.structured_output) <= fields, "structured_output",
                   f"structured_output takes {', '.join(sorted(fields))}")
            self.structured_output = StructuredOutput(**self.structured_output)
        _check(isinstance(self.structured_output, (StructuredOutput, type(None))), "structured_output",
               "structured_output must be an object with kind and spec")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        _check(isinstance(self.stop, (list, tuple, type(None))), "stop", "stop must be a string or a list of strings")
        self.stop = list(self.stop or [])
        _check(isinstance(self.stop_token_ids, (list, tuple, type(None))), "stop_token_ids",
               "stop_token_ids must be a list of non-negative integers")
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.logit_bias = _token_biases(self.logit_bias)
        if self.top_k == 0:
            self.top_k = -1
        _check(self.max_tokens is None or _is_int(self.max_tokens) and self.max_tokens >= 1, "max_tokens",
               f"max_tokens must be an integer >= 1; got {self.max_tokens!r}")
        _check(_is_num(self.temperature) and 0 <= self.temperature <= 100, "temperature",
               f"temperature must be between 0 and 100; got {self.temperature!r}")
        _check(_is_num(self.top_p) and 0 < self.top_p <= 1, "top_p", f"top_p must be in (0, 1]; got {self.top_p!r}")
        _check(_is_int(self.top_k) and self.top_k >= -1, "top_k",
               f"top_k must be -1 or 0 (disabled) or a positive integer; got {self.top_k!r}")
        _check(_is_num(self.min_p) and 0 <= self.min_p <= 1, "min_p", f"min_p must be in [0, 1]; got {self.min_p!r}")
        _check(_is_num(self.repetition_penalty) and 0 < self.repetition_penalty <= 10, "repetition_penalty",
               f"repetition_penalty must be in (0, 10]; got {self.repetition_penalty!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(_is_num(value) and -2 <= value <= 2, name, f"{name} must be between -2 and 2; got {value!r}")
        _check(self.seed is None or _is_int(self.seed) and -2**63 <= self.seed < 2**63, "seed",
               f"seed must be an integer in [-2**63, 2**63); got {self.seed!r}")
        _check(_is_int(self.top_k) and self.top_k < 2**31, "top_k", f"top_k must be below 2**31; got {self.top_k!r}")
        for name in ("include_stop_str_in_output", "ignore_eos", "skip_special_tokens"):
            _check(isinstance(getattr(self, name), bool), name, f"{name} must be true or false; got {getattr(self, name)!r}")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", "stop must be a list of non-empty strings")
        _check(len(self.stop) <= MAX_STOP_STRINGS and all(len(s) <= MAX_STOP_STRING_CHARS for s in self.stop), "stop",
               f"stop takes at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_STRING_CHARS} characters; got "
               f"{len(self.stop)}, the longest {max(map(len, self.stop), default=0)}")
        _check(all(_is_int(t) and 0 <= t < 2**31 for t in self.stop_token_ids), "stop_token_ids",
               "stop_token_ids must be a list of non-negative integers")
        _check(len(self.stop_token_ids) <= MAX_STOP_TOKEN_IDS, "stop_token_ids",
               f"stop_token_ids takes at most {MAX_STOP_TOKEN_IDS} ids; got {len(self.stop_token_ids)}")
        _check(len(self.logit_bias) <= MAX_LOGIT_BIAS, "logit_bias",
               f"logit_bias takes at most {MAX_LOGIT_BIAS} token ids; got {len(self.logit_bias)}")
        _check(_is_int(self.min_tokens) and self.min_tokens >= 0, "min_tokens",
               f"min_tokens must be an integer >= 0; got {self.min_tokens!r}")
        _check(self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens",
               f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        _check(self.logprobs is None or _is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS, "logprobs",
               f"logprobs must be between 0 and {MAX_LOGPROBS}; got {self.logprobs!r}")
        _check(self.prompt_logprobs is None or _is_int(self.prompt_logprobs) and 0 <= self.prompt_logprobs <= MAX_LOGPROBS,
               "prompt_logprobs", f"prompt_logprobs must be between 0 and {MAX_LOGPROBS}; got {self.prompt_logprobs!r}")
        _check(all(-100 <= v <= 100 for v in self.logit_bias.values()), "logit_bias",
               "logit_bias values must be between -100 and 100")

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _token_biases(logit_bias) -> dict[int, float]:
    _check(isinstance(logit_bias, (dict, type(None))), "logit_bias",
           "logit_bias must be an object mapping token ids to biases")
    logit_bias = logit_bias or {}
    try:
        ids = [int(k) for k in logit_bias]
    except (TypeError, ValueError):
        raise InvalidRequestError("logit_bias keys must be token ids (integers as strings)", "logit_bias") from None
    _check(all(0 <= i < 2**31 for i in ids), "logit_bias", "logit_bias keys must be token ids (non-negative integers)")
    _check(all(_is_num(v) for v in logit_bias.values()), "logit_bias",
           "logit_bias values must be numbers between -100 and 100")
    return dict(zip(ids, map(float, logit_bias.values())))


def _check(ok: bool, param: str, message: str):
    if not ok:
        raise InvalidRequestError(message, param)


@dataclass
class SamplerRow:
    """What the sampler needs of one sequence; the token list is shared, sliced only when a penalty needs it."""
    params: SamplingParams
    generator: torch.Generator
    token_ids: list[int]                # prompt + output
    num_prompt_tokens: int
    eos_token_ids: tuple[int, ...]
    grammar: object | None = None       # its llguidance matcher (server/structured_output.py), if it has one

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]


@dataclass
class SampledToken:
    token_id: int
    logprob: float | None = None
    top_logprobs: dict[int, float] | None = None


def sample(logits: torch.Tensor, rows: list[SamplerRow], grammar_bitmask: torch.Tensor | None = None
           ) -> list[SampledToken]:
    # logits: [B, V] float32, one row per entry of rows; grammar_bitmask: the constrained rows' masks, in order
    # (server/grammar_masks.py fill_bitmasks), when filled ahead; else they are filled here.
    raw_logits = logits
    logits = _apply_penalties_and_bias(logits.clone(), rows)
    constrained = [i for i, r in enumerate(rows) if r.grammar is not None]
    if constrained:
        from server.grammar_masks import apply_bitmasks, fill_bitmasks
        if grammar_bitmask is None:
            grammar_bitmask = fill_bitmasks([rows[i].grammar for i in constrained], logits.shape[1])
        apply_bitmasks(logits, constrained, grammar_bitmask)
    token_ids = logits.argmax(dim=-1)
    sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
    if sampled:
        temperatures = torch.tensor([rows[i].params.temperature for i in sampled], device=logits.device)
        probs = torch.softmax(_apply_filters(logits[sampled] / temperatures[:, None], [rows[i] for i in sampled]), -1)
        for j, i in enumerate(sampled):
            # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p; the noise comes from the row's own RNG.
            noise = torch.empty_like(probs[j]).exponential_(generator=rows[i].generator)
            token_ids[i] = (probs[j] / noise).argmax()
    out = [SampledToken(t) for t in token_ids.tolist()]
    want = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
    if want:
        scored = token_logprobs(raw_logits[want], token_ids[want], [rows[i].params.logprobs for i in want])
        for i, s in zip(want, scored):
            out[i] = s
    return out


def token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, num_top: list[int]) -> list[SampledToken]:
    """Each row's log-probability of token_ids[row] under the model's raw distribution, with its top-N."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(1, token_ids[:, None]).squeeze(1).tolist()
    k = max(num_top)
    top_vals, top_ids = logprobs.topk(k, dim=-1)
    top_vals, top_ids = top_vals.tolist(), top_ids.tolist()
    return [SampledToken(t, c, dict(zip(ids[:n], vals[:n])))
            for t, c, ids, vals, n in zip(token_ids.tolist(), chosen, top_ids, top_vals, num_top)]


def _apply_penalties_and_bias(logits: torch.Tensor, rows: list[SamplerRow]) -> torch.Tensor:
    vocab = logits.shape[1]
    for i, row in enumerate(rows):
        p = row.params
        if p.logit_bias:
            ids = torch.tensor([t for t in p.logit_bias if t < vocab], dtype=torch.long, device=logits.device)
            vals = torch.tensor([v for t, v in p.logit_bias.items() if t < vocab], device=logits.device)
            logits[i].index_add_(0, ids, vals)
        if row.num_output_tokens < p.min_tokens:
            banned = [t for t in p.stop_token_ids if t < vocab]
            if not p.ignore_eos:
                banned += list(row.eos_token_ids)
            logits[i, banned] = -math.inf
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(row.token_ids)), device=logits.device)
            scores = logits[i, seen]
            logits[i, seen] = torch.where(scores > 0, scores / p.repetition_penalty, scores * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and row.num_output_tokens:
            counts = torch.bincount(torch.tensor(row.output_token_ids, device=logits.device), minlength=vocab)[:vocab]
            logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)
    return logits


def _apply_filters(logits: torch.Tensor, rows: list[SamplerRow]) -> torch.Tensor:
    top_k = [r.params.top_k for r in rows]
    top_p = [r.params.top_p for r in rows]
    min_p = [r.params.min_p for r in rows]
    if all(k == -1 for k in top_k) and all(p >= 1.0 for p in top_p) and not any(min_p):
        return logits
    device = logits.device
    return filter_logits(logits, torch.tensor(top_k, device=device), torch.tensor(top_p, device=device),
                         torch.tensor(min_p, device=device))


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask to -inf what top_k ([B], -1 off), top_p ([B], mass kept) and min_p ([B], share of the max) drop."""
    vocab = logits.shape[1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(vocab, device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k, vocab).clamp(max=vocab)
    drop = rank >= k[:, None]
    sorted_logits = sorted_logits.masked_fill(drop, -math.inf)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs   # probability mass of strictly better tokens
    drop |= mass_before >= top_p[:, None]
    drop |= probs < min_p[:, None] * probs[:, :1]
    drop[:, 0] = False                            # the best token always survives
    return logits.scatter(1, order, sorted_logits.masked_fill(drop, -math.inf))
