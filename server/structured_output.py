"""Structured output: grammars (JSON schema, regex, choice list, Lark / GBNF) compiled into llguidance matchers,
and the token masks they put on the sampler's logits.

llguidance gives, for a matcher's state, the bitmask of the tokens the grammar allows next; it releases the GIL
while it works. A spec is compiled once, on a worker thread (never on the event loop or the step thread), and
kept in an LRU cache; each request takes a copy of the compiled matcher. A spec that does not compile is cached
too, as its error, so sending it again costs nothing: it is an InvalidRequestError naming the request field.
"""
import asyncio
import json
import math
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import torch

from server.sampling import InvalidRequestError, StructuredOutput

CACHE_SIZE = 512       # compiled specs kept
MAX_CHOICES = 1024     # strings in a choice list


def grammar_text(spec: StructuredOutput) -> str:
    """llguidance's grammar for a spec; ValueError says what is wrong with the spec."""
    import llguidance
    if spec.kind == "json":
        try:
            schema = json.loads(spec.spec)
        except (ValueError, RecursionError) as e:
            raise ValueError(f"the JSON schema is not valid JSON: {str(e)[:200]}") from None
        if not isinstance(schema, (dict, bool)):
            raise ValueError("a JSON schema must be an object (or true / false)")
        # Compact JSON: with free whitespace a model can spend its whole budget between two tokens.
        return llguidance.LLMatcher.grammar_from_json_schema(json.dumps(closed_schema(schema)),
                                                            defaults={"whitespace_flexible": False})
    if spec.kind == "regex":
        return llguidance.grammar_from("regex", spec.spec)
    if spec.kind == "choice":
        try:
            choices = json.loads(spec.spec)
        except (ValueError, RecursionError):
            choices = None
        if not (isinstance(choices, list) and 0 < len(choices) <= MAX_CHOICES
                and all(isinstance(c, str) and c for c in choices)):
            raise ValueError(f"choice must be a list of 1 to {MAX_CHOICES} non-empty strings")
        return llguidance.grammar_from("choice", spec.spec)
    return llguidance.grammar_from("grammar", spec.spec)


def closed_schema(schema):
    """schema with additionalProperties false on every object that lists properties and says nothing of extra
    ones (vLLM's default through xgrammar's strict mode): a model is not left to invent arguments nobody asked for.
    allOf branches are left open: closing each would forbid the properties the others add."""
    if isinstance(schema, list):
        return [closed_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed_schema(v) if k in _SUBSCHEMAS else v for k, v in schema.items()}
    for key in ("properties", "$defs", "definitions", "patternProperties"):
        if isinstance(schema.get(key), dict):
            out[key] = {name: closed_schema(s) for name, s in schema[key].items()}
    if "properties" in schema and "additionalProperties" not in schema and "patternProperties" not in schema:
        out["additionalProperties"] = False
    return out


_SUBSCHEMAS = ("items", "prefixItems", "anyOf", "oneOf", "not", "if", "then", "else", "additionalProperties",
               "contains")


class GrammarCompiler:
    """Compiles specs for one model's tokenizer; used from the engine core's event loop."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids, workers: int = 2):
        self._hf_tokenizer, self.vocab_size, self._eos = tokenizer, vocab_size, list(eos_token_ids)
        self._tokenizer = None    # llguidance's view of the vocabulary, built on first use
        self._cache: OrderedDict[tuple[str, str], object] = OrderedDict()   # -> LLMatcher, or an error message
        self._pending: dict[tuple[str, str], asyncio.Future] = {}
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lmserve-grammar")

    async def matcher(self, spec: StructuredOutput):
        """A fresh matcher for spec (an llguidance LLMatcher at the grammar's start), or InvalidRequestError."""
        key = (spec.kind, spec.spec)
        compiled = self._cache.get(key)
        if compiled is None:
            future = self._pending.get(key)
            if future is None:   # one compile per spec, however many requests wait for it
                future = asyncio.get_running_loop().run_in_executor(self._executor, self._compile, spec)
                self._pending[key] = future
                future.add_done_callback(lambda f: self._remember(key, f))
            compiled = await asyncio.shield(future)
        else:
            self._cache.move_to_end(key)
        if isinstance(compiled, str):
            raise InvalidRequestError(f"{spec.field}: {compiled}", spec.field)
        return compiled.deep_copy()

    def _remember(self, key: tuple[str, str], future: asyncio.Future):
        del self._pending[key]
        if future.cancelled() or future.exception() is not None:
            return
        self._cache[key] = future.result()
        if len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)

    def _compile(self, spec: StructuredOutput):
        import llguidance
        try:
            tokenizer = self._llg_tokenizer()
            grammar = grammar_text(spec)
        except ValueError as e:
            return str(e)
        matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        if matcher.is_error():
            return matcher.get_error().strip()[:1000]
        return matcher

    def _llg_tokenizer(self):
        if self._tokenizer is None:
            import llguidance.hf
            try:
                self._tokenizer = llguidance.hf.from_tokenizer(self._hf_tokenizer, n_vocab=self.vocab_size,
                                                               eos_token=self._eos)
            except Exception as e:
                raise ValueError(f"structured output needs a byte-level BPE or SentencePiece tokenizer, and this "
                                 f"model's cannot be read as one ({e})") from None
        return self._tokenizer

    def shutdown(self):
        self._executor.shutdown(wait=False, cancel_futures=True)


_fill_executor = None


def fill_bitmasks(matchers: list, vocab: int) -> torch.Tensor:
    """The tokens each matcher allows next, as bits: int32 [len(matchers), ceil(vocab / 32)] on the CPU. Safe to
    run on a thread of its own while the forward pass runs (the matchers move only after sampling). (Not through
    llguidance.torch, whose import pulls in torch.compile: seconds, once.)"""
    import llguidance
    global _fill_executor
    bitmask = torch.empty(len(matchers), (vocab + 31) // 32, dtype=torch.int32)
    row_bytes = bitmask.shape[1] * 4
    if len(matchers) == 1:
        matchers[0].unsafe_compute_mask_ptr(bitmask.data_ptr(), row_bytes)
    else:
        if _fill_executor is None:
            _fill_executor = llguidance.LLExecutor()
        _fill_executor.unsafe_compute_mask_ptr([(m, j) for j, m in enumerate(matchers)], bitmask.data_ptr(),
                                               row_bytes, len(matchers))
    return bitmask


def apply_bitmasks(logits: torch.Tensor, rows: list[int], bitmask: torch.Tensor) -> None:
    """In place: each listed row of logits [B, V] keeps only the tokens its bitmask row allows (the rest -inf).
    A row that the other constraints (min_tokens' ban on EOS) left with no token gets the grammar's own set."""
    vocab = logits.shape[1]
    bitmask = bitmask.to(logits.device, non_blocking=True)
    bits = torch.arange(32, dtype=torch.int32, device=logits.device)
    allowed = ((bitmask[:, :, None] >> bits) & 1).bool().view(len(rows), -1)[:, :vocab]
    index = torch.tensor(rows, device=logits.device)
    masked = logits[index].masked_fill(~allowed, -math.inf)
    nothing_left = torch.isneginf(masked).all(dim=-1, keepdim=True)
    logits[index] = torch.where(nothing_left & allowed, 0.0, masked)


def apply_grammar_masks(logits: torch.Tensor, rows: list[int], matchers: list) -> None:
    """apply_bitmasks with the matchers' masks filled now."""
    apply_bitmasks(logits, rows, fill_bitmasks(matchers, logits.shape[1]))
