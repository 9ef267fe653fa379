"""The seeded workload of a load run: when each request is sent and what it asks for.

Arrivals are a Poisson process (exponential gaps at the offered rate), fixed in advance from the seed,
so the same command sends the same requests at the same offsets whatever the server does. Token counts
come from a distribution spec: `32` (always 32), `16:64` (uniform, both ends included) or
`normal:128:32` (mean 128, standard deviation 32, rounded, at least 1).
"""
import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Distribution:
    kind: str          # fixed | uniform | normal
    a: float           # the value, the low end, or the mean
    b: float = 0.0     # the high end or the standard deviation

    @classmethod
    def parse(cls, spec: str) -> "Distribution":
        parts = spec.split(":")
        try:
            if len(parts) == 1:
                dist = cls("fixed", int(parts[0]))
            elif len(parts) == 2:
                dist = cls("uniform", int(parts[0]), int(parts[1]))
            elif len(parts) == 3 and parts[0] == "normal":
                dist = cls("normal", float(parts[1]), float(parts[2]))
            else:
                raise ValueError
        except ValueError:
            raise ValueError(f"a token count is N, LO:HI or normal:MEAN:STD; got {spec!r}") from None
        if dist.a < 1 or (dist.kind == "uniform" and dist.b < dist.a) or (dist.kind == "normal" and dist.b < 0):
            raise ValueError(f"a token count must be at least 1 (LO <= HI, STD >= 0); got {spec!r}")
        return dist

    def sample(self, rng: random.Random) -> int:
        if self.kind == "fixed":
            return int(self.a)
        if self.kind == "uniform":
            return rng.randint(int(self.a), int(self.b))
        return max(1, round(rng.gauss(self.a, self.b)))

    @property
    def mean(self) -> float:
        return (self.a + self.b) / 2 if self.kind == "uniform" else self.a


# The grammar of a load's constrained requests: a JSON object that never completes within a load's max_tokens
# (500 strings at least), so constrained and unconstrained requests generate the same number of tokens.
LOAD_SCHEMA = {"type": "object", "required": ["items"], "additionalProperties": False,
               "properties": {"items": {"type": "array", "minItems": 500, "items": {"type": "string", "maxLength": 12}}}}


@dataclass(frozen=True)
class PlannedRequest:
    index: int
    send_at: float            # seconds after the run starts
    prompt_token_ids: list[int]
    max_tokens: int
    model: str
    structured: bool = False  # constrained by LOAD_SCHEMA


def poisson_arrivals(rng: random.Random, qps: float, duration: float | None = None,
                     num_requests: int | None = None) -> list[float]:
    """Send offsets of a Poisson process at qps, up to the duration or the count (whichever is given)."""
    if qps <= 0:
        raise ValueError(f"qps must be positive; got {qps}")
    if (duration is None) == (num_requests is None):
        raise ValueError("give exactly one of duration and num_requests")
    times, t = [], 0.0
    while True:
        t += rng.expovariate(qps)
        if (duration is not None and t >= duration) or (num_requests is not None and len(times) == num_requests):
            return times
        times.append(t)


@dataclass
class Workload:
    qps: float
    prompt_tokens: Distribution
    max_tokens: Distribution
    models: list[str]                 # each request names one of these, round robin
    duration: float | None = None
    num_requests: int | None = None
    shared_prefix_tokens: int = 0     # every prompt starts with one of prefix_groups prefixes of this many tokens
    seed: int = 0
    structured_fraction: float = 0.0  # this share of the requests, spread evenly, carry LOAD_SCHEMA
    prefix_groups: int = 1            # distinct shared prefixes, each request's drawn at random

    def plan(self, vocabulary: list[int]) -> list[PlannedRequest]:
        """The requests, with prompts drawn from vocabulary (token ids the model's tokenizer produces)."""
        if not vocabulary:
            raise ValueError("the vocabulary to draw prompts from is empty")
        rng = random.Random(self.seed)
        arrivals = poisson_arrivals(rng, self.qps, self.duration, self.num_requests)
        if self.prefix_groups < 1:
            raise ValueError(f"prefix_groups must be at least 1; got {self.prefix_groups}")
        prefixes = [[rng.choice(vocabulary) for _ in range(self.shared_prefix_tokens)] for _ in range(self.prefix_groups)]
        if not 0 <= self.structured_fraction <= 1:
            raise ValueError(f"structured_fraction must be in [0, 1]; got {self.structured_fraction}")
        f = self.structured_fraction
        def prefix() -> list[int]:   # one group draws nothing: seeded workloads stay as they were
            return prefixes[0] if len(prefixes) == 1 else rng.choice(prefixes)
        return [PlannedRequest(i, t, prefix() + [rng.choice(vocabulary) for _ in range(self.prompt_tokens.sample(rng))],
                               self.max_tokens.sample(rng), self.models[i % len(self.models)],
                               int((i + 1) * f) > int(i * f))
                for i, t in enumerate(arrivals)]
