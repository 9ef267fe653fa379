"""Tokenizer loading, chat templates, and incremental detokenization that never splits a multi-byte character."""
import functools
import json
import re
import secrets
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from server.sampling import InvalidRequestError

REPLACEMENT_CHAR = "\ufffd"


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)


def eos_token_ids(path: str | Path, hf_config, tokenizer) -> tuple[int, ...]:
    """EOS ids from config.json, generation_config.json and the tokenizer (Llama 3 lists several)."""
    ids: set[int] = set()
    sources = [getattr(hf_config, "eos_token_id", None), tokenizer.eos_token_id]
    gen = Path(path) / "generation_config.json"
    if gen.is_file():
        sources.append(json.loads(gen.read_text()).get("eos_token_id"))
    for value in sources:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(v for v in value if isinstance(v, int))
    return tuple(sorted(ids))


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = True,
                tools: list[dict] | None = None) -> str:
    if not tokenizer.chat_template:
        raise ValueError("this model's tokenizer has no chat template")
    extra = {"tools": tools} if tools else {}
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt, **extra)


def template_knows_tools(tokenizer) -> bool:
    """Whether the chat template renders a `tools` list (else tools are described in a system turn): a probe tool's
    name must appear in what it renders."""
    probe = [{"type": "function", "function": {"name": "lmserve_probe_tool", "description": "probe",
                                               "parameters": {"type": "object", "properties": {}}}}]
    try:
        rendered = render_chat(tokenizer, [{"role": "user", "content": "hi"}], tools=probe)
    except Exception:   # no template, or one that raises on tools
        return False
    return "lmserve_probe_tool" in rendered


def encode_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = True,
                tools: list[dict] | None = None) -> list[int]:
    """Token ids of a chat prompt. Only the template's own text becomes control tokens: each message's content
    and name are tokenized as plain text, so "<|im_start|>system" typed by a client stays those characters and
    cannot forge a turn. Otherwise the ids are those of the whole rendered text: it is cut at the template's
    control tokens, as the tokenizer itself cuts it, and each run between them (template text and client text
    together) is encoded in one piece. The template writes any BOS itself, so none is added on top of it."""
    nonce = secrets.token_hex(8)
    texts: list[str] = []

    def placeholder(text: str) -> str:
        texts.append(text)
        return f"lmserve{nonce}x{len(texts) - 1}x"
    # empty strings stay empty: templates test content for truth (an assistant turn with only tool calls)
    guarded = [{k: placeholder(v) if k in ("content", "name") and isinstance(v, str) and v else v
                for k, v in m.items()} for m in messages]
    added, controls = _control_tokens(tokenizer)
    # Tool definitions and earlier calls reach the text through the template's own filters (tojson), where
    # they cannot be guarded: one that holds a control token's text is refused.
    for param, value in [("tools", tools)] + [("messages", [m.get("tool_calls"), m.get("tool_call_id")])
                                              for m in messages if m.get("tool_calls") or m.get("tool_call_id")]:
        found = controls.search(json.dumps(value, ensure_ascii=False)) if controls and value else None
        if found:
            raise InvalidRequestError(f"{param} contains the control token {found.group(0)!r}", param)
    rendered = render_chat(tokenizer, guarded, add_generation_prompt, tools)
    ids: list[int] = []
    run = ""   # text since the last control token
    for i, piece in enumerate(re.split(f"lmserve{nonce}x(\\d+)x", rendered)):
        if i % 2:   # a client's text
            run += texts[int(piece)]
            continue
        for j, part in enumerate(controls.split(piece) if controls else [piece]):
            if j % 2:
                if run:
                    ids += tokenizer.encode(run, add_special_tokens=False, split_special_tokens=True)
                    run = ""
                ids.append(added[part])
            else:
                run += part
    if run:
        ids += tokenizer.encode(run, add_special_tokens=False, split_special_tokens=True)
    return ids


@functools.lru_cache(maxsize=8)
def _control_tokens(tokenizer) -> tuple[dict[str, int], re.Pattern | None]:
    """The tokenizer's added tokens (text -> id) and a pattern that splits text at them, longest first; made once
    per tokenizer, not per request."""
    added = tokenizer.get_added_vocab()
    if not added:
        return added, None
    return added, re.compile("(" + "|".join(re.escape(t) for t in sorted(added, key=len, reverse=True)) + ")")


class IncrementalDetokenizer:
    """Turns a growing token list into text deltas.

    Decodes a short window of earlier tokens with the new ones and emits only the text past the window, so
    leading spaces and merges come out right; while the tail decodes to U+FFFD (a multi-byte character cut
    between tokens) it emits nothing and waits for the rest of the bytes; the last step (final=True) emits
    the tail as it is, so the whole text equals decoding the whole output.
    """

    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True):
        self._decode = tokenizer.backend_tokenizer.decode if hasattr(tokenizer, "backend_tokenizer") else tokenizer.decode
        self.skip_special_tokens = skip_special_tokens
        self.token_ids = list(prompt_token_ids[-6:])
        self.prefix_offset = max(len(self.token_ids) - 5, 0)
        self.read_offset = len(self.token_ids)
        self.text = ""

    def step(self, new_token_ids: list[int], final: bool = False) -> str:
        self.token_ids.extend(new_token_ids)
        prefix = self._decode(self.token_ids[self.prefix_offset:self.read_offset], skip_special_tokens=self.skip_special_tokens)
        full = self._decode(self.token_ids[self.prefix_offset:], skip_special_tokens=self.skip_special_tokens)
        if len(full) > len(prefix) and (final or not full.endswith(REPLACEMENT_CHAR)):
            delta = full[len(prefix):]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.token_ids)
            self.text += delta
            return delta
        return ""
