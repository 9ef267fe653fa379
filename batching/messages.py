"""The engine socket's messages: what API processes send the engine core, and what it sends back.

msgpack through msgspec, decoded against these types and nothing else: a payload that does not fit them is
refused with a log line, and nothing that reaches the socket is ever unpickled, so no message can run code.
One step's outputs for one API process travel as one StepOutputs message.
"""
from typing import Any

import msgspec

from server.sampling import SampledToken, SamplingParams


class ErrorInfo(msgspec.Struct, array_like=True):
    kind: str                   # a class name from server/errors.py STATUS
    message: str
    param: str | None = None


class AddRequest(msgspec.Struct, tag="add"):
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams      # validated again as it is decoded (SamplingParams.__post_init__)
    adapter: str | None = None  # a loaded LoRA adapter's name; None: the base model
    arrival_time: float = 0.0   # time.monotonic() in the API process (one clock per machine)


class Abort(msgspec.Struct, tag="abort"):
    request_ids: list[str]
    reason: str = "abort"       # "stop" when the API process found a stop string


class Call(msgspec.Struct, tag="call"):
    """A utility call answered by one Reply: method is one of EngineCore.CALLS."""
    call_id: int
    method: str
    args: list[Any] = []


class CoreOutput(msgspec.Struct, array_like=True):
    """One request's news from one step: new tokens, and on the last one its finish reason or error."""
    request_id: str
    token_ids: list[int]
    logprobs: list[SampledToken] | None = None
    finish_reason: str | None = None      # "stop" | "length" | "abort" once finished
    num_cached_tokens: int = 0            # on the first output: prompt tokens served from the prefix cache
    prompt_logprobs: list[SampledToken | None] | None = None   # on the first output, when asked
    error: ErrorInfo | None = None        # the request ended early (refused, timed out, failed)


class StepOutputs(msgspec.Struct, tag="step"):
    outputs: list[CoreOutput]


class Reply(msgspec.Struct, tag="reply"):
    call_id: int
    result: Any = None
    error: ErrorInfo | None = None


class EngineInfo(msgspec.Struct):
    """What an API process needs to know about the engine it serves, sent once at the start."""
    model_name: str
    model_path: str
    max_model_len: int
    vocab_size: int
    kv_cache_tokens: int
    eos_token_ids: list[int]


class AdapterInfo(msgspec.Struct, array_like=True):
    name: str
    path: str
    rank: int


ToCore = AddRequest | Abort | Call
FromCore = StepOutputs | Reply

encoder = msgspec.msgpack.Encoder()
to_core_decoder = msgspec.msgpack.Decoder(ToCore)
from_core_decoder = msgspec.msgpack.Decoder(FromCore)
