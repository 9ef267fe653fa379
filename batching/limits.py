"""check_prompt: what a prompt's token ids and its max_tokens must satisfy to run on this engine.

The API process checks before it builds a request's detokenizer; the engine core checks again, since it trusts
nothing that arrives on its socket.
"""
from server.sampling import InvalidRequestError, SamplingParams


def check_prompt(token_ids: list[int], params: SamplingParams, vocab_size: int, max_model_len: int,
                 kv_cache_tokens: int) -> int:
    """The request's max_tokens resolved against the room left in the context; InvalidRequestError otherwise."""
    if not token_ids:
        raise InvalidRequestError("prompt must not be empty", "prompt")
    bad = [t for t in token_ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab_size]
    if bad:
        raise InvalidRequestError(f"prompt token ids must be integers in [0, {vocab_size}); got {bad[0]!r}", "prompt")
    n = len(token_ids)
    if n >= max_model_len:
        raise InvalidRequestError(
            f"this model's maximum context length is {max_model_len} tokens, but the prompt has {n} tokens; "
            f"at most {max_model_len - 1} prompt tokens fit", "prompt")
    room = min(max_model_len, kv_cache_tokens) - n
    if room < 1:
        raise InvalidRequestError(f"the prompt has {n} tokens but the KV cache holds {kv_cache_tokens}", "prompt")
    max_tokens = params.max_tokens if params.max_tokens is not None else room
    if max_tokens > room:
        raise InvalidRequestError(
            f"max_tokens must be between 1 and {room} for this prompt ({n} tokens, context length "
            f"{max_model_len}); got {max_tokens}", "max_tokens")
    return max_tokens
