"""Tokenizer loading, chat templates, and incremental detokenization that never splits a multi-byte character."""
import json
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

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


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> str:
    if not tokenizer.chat_template:
        raise ValueError("this model's tokenizer has no chat template")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def encode_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of a chat prompt. The template writes any BOS itself, so none is added on top of it."""
    text = render_chat(tokenizer, messages, add_generation_prompt)
    return tokenizer.encode(text, add_special_tokens=False)


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
