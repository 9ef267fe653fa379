"""Sequence: one request's tokens, how many of them are in the KV cache, its block table and its status."""
import enum
import time
from dataclasses import dataclass, field

import torch

from server.sampling import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"      # admitted, no KV yet (new or preempted)
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"            # EOS, a stop token id or a stop string
    LENGTH = "length"        # max_tokens or the context length
    ABORT = "abort"          # client went away or the request was cancelled


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    generator: torch.Generator          # per-request RNG: same seed, same tokens, whatever shares the batch
    max_tokens: int                     # params.max_tokens resolved against the context length
    arrival_time: float = field(default_factory=time.monotonic)
    token_ids: list[int] = field(init=False)   # prompt + output
    num_computed_tokens: int = 0        # tokens whose K/V are in the cache
    num_cached_tokens: int | None = None  # prefix-cache hits at first scheduling
    block_table: list[int] = field(default_factory=list)
    num_registered_blocks: int = 0      # leading blocks already hashed into the prefix cache
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0
    first_scheduled_time: float | None = None
    last_token_time: float | None = None
    prompt_logprobs: list = field(default_factory=list)  # for prompt tokens 1.., when params.prompt_logprobs is set
    lora: object | None = None          # the LoRAAdapter it runs with (server/lora.py); None: the base model
    grammar: object | None = None       # its structured-output matcher (server/structured_output.py): advanced
                                        # by each sampled token, so it survives preemption with the tokens
    grammar_armed: bool = True          # False until the token its spec starts after (start_after) is sampled

    def __post_init__(self):
        self.token_ids = list(self.prompt_token_ids)

    @property
    def cache_salt(self) -> tuple | None:
        """Roots the prefix-cache hash chain: K/V computed under an adapter is reused only under that adapter."""
        return None if self.lora is None else ("lora", self.lora.id)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids):]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
