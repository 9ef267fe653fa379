"""Structured output: grammars (JSON schema, regex, choice list, Lark / GBNF) compiled into llguidance matchers.

llguidance gives, for a matcher's state, the bitmask of the tokens the grammar allows next (server/grammar_masks.py
puts them on the logits); it releases the GIL while it works. A spec is compiled once, on a worker thread (never
on the event loop or the step thread), under parser limits that bound each mask's work, and its first mask is
computed there too, so a grammar whose lexer would blow up is refused before it reaches a step. Compiled specs
are kept in an LRU cache and each request takes a copy; a spec that does not compile is cached too, as its
error, so sending it again costs nothing: it is an InvalidRequestError naming the request field.
"""
import asyncio
import json
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

from server.sampling import InvalidRequestError, StructuredOutput

CACHE_SIZE = 512             # compiled specs kept
MAX_CHOICES = 1024           # strings in a choice list
MAX_GBNF_CHARS = 32 * 1024   # llguidance converts GBNF to Lark in Python, with regexes quadratic in some inputs
MAX_SCHEMA_DEPTH = 64        # nesting of a JSON schema (llguidance refuses much deeper ones anyway)
# Tighter than llguidance's defaults: each mask's lexer and parser work is bounded, so one request's grammar
# cannot stall a step for everyone.
PARSER_LIMITS = dict(initial_lexer_fuel=300_000, step_lexer_fuel=100_000, max_lexer_states=100_000,
                     step_max_items=20_000, verbose_errors=False)


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
    if "::=" in spec.spec:   # llama.cpp's GBNF; Lark otherwise
        if len(spec.spec) > MAX_GBNF_CHARS:
            raise ValueError(f"a GBNF grammar may have at most {MAX_GBNF_CHARS} characters (Lark has no such limit)")
        from llguidance.gbnf_to_lark import gbnf_to_lark
        try:
            return llguidance.LLMatcher.grammar_from_lark(gbnf_to_lark(spec.spec))
        except Exception as e:   # the converter's own errors, and plain Exceptions for unknown rules
            raise ValueError(f"the GBNF grammar does not parse: {str(e)[:500] or type(e).__name__}") from None
    return llguidance.LLMatcher.grammar_from_lark(spec.spec)


def closed_schema(schema, depth: int = 0):
    """schema with additionalProperties false on every object that lists properties and says nothing of extra
    ones (vLLM's default through xgrammar's strict mode): a model is not left to invent arguments nobody asked for.
    allOf branches are left open: closing each would forbid the properties the others add. ValueError past
    MAX_SCHEMA_DEPTH levels."""
    if depth > MAX_SCHEMA_DEPTH:
        raise ValueError(f"the JSON schema is nested more than {MAX_SCHEMA_DEPTH} levels deep")
    if isinstance(schema, list):
        return [closed_schema(s, depth + 1) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed_schema(v, depth + 1) if k in _SUBSCHEMAS else v for k, v in schema.items()}
    for key in ("properties", "$defs", "definitions", "patternProperties"):
        if isinstance(schema.get(key), dict):
            out[key] = {name: closed_schema(s, depth + 1) for name, s in schema[key].items()}
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
        except (ValueError, RecursionError) as e:
            return str(e)[:1000] or type(e).__name__
        matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0,
                                       limits=llguidance.LLParserLimits(**PARSER_LIMITS))
        if matcher.is_error():
            return matcher.get_error().strip()[:1000]
        probe = matcher.deep_copy()   # the first mask builds the lexer: its blow-up is an error here, not mid-step
        probe.compute_bitmask()
        if probe.is_error():
            return f"the grammar cannot be used (too complex, or it allows no output): {probe.get_error().strip()[:1000]}"
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
