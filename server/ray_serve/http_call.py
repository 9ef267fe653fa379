"""HttpCall: one HTTP request as the ingress hands it to an engine replica, with what the router reads from it."""
import json
from dataclasses import dataclass

MAX_PROMPT_CHARS = 8192   # the router looks at no more of a prompt than this


@dataclass
class HttpCall:
    method: str
    path: str
    query_string: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    prompt: str               # the prompt's text (a chat's messages in order), for prefix affinity; "" if none
    model: str | None         # the model the request names: the base model's or a LoRA adapter's name
    replica: str | None       # the replica the client asked for (header x-lmserve-replica), e.g. to scrape it
    client: tuple[str, int] | None = None   # the client's address, as the ingress saw it (for the audit log)


def routing_fields(body: bytes) -> tuple[str, str | None]:
    """(prompt text, model) of an OpenAI or /generate request body; ("", None) for anything else. Only read to
    route: the replica parses and checks the request itself."""
    try:
        request = json.loads(body) if body else None
    except (ValueError, UnicodeDecodeError, RecursionError):   # the replica answers 400 for these
        return "", None
    if not isinstance(request, dict):
        return "", None
    model = request.get("model") if isinstance(request.get("model"), str) else None
    return _text(request.get("prompt"), request.get("messages"))[:MAX_PROMPT_CHARS], model


def _text(prompt, messages) -> str:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt:
        first = prompt[0]
        if isinstance(first, str):        # a batch of prompts: the first one's prefix
            return first
        if isinstance(first, int):        # token ids
            return " ".join(str(t) for t in prompt if isinstance(t, int))
        if isinstance(first, list):       # a batch of token-id prompts
            return _text(first, None)
    if isinstance(messages, list):
        parts = []
        for m in messages:
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, list):
                content = "".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
            if isinstance(content, str):
                parts.append(f"{m.get('role')}:{content}\n")
        return "".join(parts)
    return ""
