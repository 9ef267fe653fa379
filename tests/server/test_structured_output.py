"""Structured output on the tiny random-weight model, where nothing but the grammar keeps the output valid.

Hypothesis draws JSON schemas (objects, arrays, enums, bounded numbers, strings, nesting, required and optional
properties), regexes and choice lists; every completion must parse and validate, greedy and sampled, batched
beside unconstrained requests whose tokens stay exactly what they are alone.
"""
import asyncio
import json
import re
import string
import threading
import time

import jsonschema
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server import structured_output
from server.sampling import InvalidRequestError, SamplingParams, StructuredOutput
from server.grammar_masks import apply_bitmasks, fill_bitmasks
from tests.conftest import collect, random_prompts
from tests.server.test_engine import assert_all_blocks_free, make_engine

PROPERTY = settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
WORDS = st.text(alphabet=string.ascii_letters + " -", min_size=1, max_size=8)
NAMES = st.from_regex(r"[a-z]{1,6}", fullmatch=True)


def _bounded(kind: str, lo: float, span: float) -> dict:
    return {"type": kind, "minimum": lo, "maximum": lo + span}


LEAVES = st.one_of(
    st.builds(_bounded, st.just("integer"), st.integers(-1000, 1000), st.integers(0, 500)),
    # multipleOf bounds the digits: an unbounded fraction lets a random model write digits until max_tokens
    st.builds(_bounded, st.just("number"), st.integers(-50, 50), st.integers(1, 100)).map(lambda s: s | {"multipleOf": 0.25}),
    st.just({"type": "boolean"}),
    st.just({"type": "null"}),
    st.lists(WORDS, min_size=1, max_size=4, unique=True).map(lambda values: {"enum": values}),
    st.integers(0, 10).map(lambda n: {"type": "string", "maxLength": n}),
)


def _object(props: dict):
    return st.lists(st.sampled_from(sorted(props)), unique=True).map(
        lambda required: {"type": "object", "properties": props, "required": required, "additionalProperties": False})


def _containers(children):
    arrays = st.builds(lambda item, lo, extra: {"type": "array", "items": item, "minItems": lo, "maxItems": lo + extra},
                       children, st.integers(0, 2), st.integers(0, 3))
    objects = st.dictionaries(NAMES, children, min_size=1, max_size=4).flatmap(_object)
    return st.one_of(arrays, objects)


SCHEMAS = st.dictionaries(NAMES, st.recursive(LEAVES, _containers, max_leaves=6), min_size=1, max_size=4).flatmap(_object)
REGEXES = st.lists(st.sampled_from([r"[a-z]{1,5}", r"[0-9]{2,4}", r"(cat|dog|emu)", r"-", r"[A-F0-9]{3}", r"x?y+z{0,2}"]),
                   min_size=1, max_size=4).map("".join)
CHOICES = st.lists(WORDS, min_size=1, max_size=6, unique=True)


class Loop:
    """One event loop for a whole property test: the engine serves the loop it started on."""

    def __init__(self, **engine_kw):
        self.loop = asyncio.new_event_loop()
        self.engine = None
        self.engine_kw = engine_kw

    def __enter__(self):
        return self

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    def __exit__(self, *exc):
        if self.engine is not None:
            self.run(self.engine.shutdown())
        self.loop.close()


def constrained(kind: str, spec: str, temperature: float, seed: int, max_tokens: int = 256) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed,
                          structured_output=StructuredOutput(kind, spec))


@pytest.fixture(scope="module")
def plain_prompts():
    return random_prompts(2, [5, 11], seed=3)


def _check_batch(lp: "Loop", cases, plain_prompts, alone, validate):
    """cases: [(prompt, params)] run together with the unconstrained plain_prompts; validate(text) per case."""
    plain = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)

    async def main():
        return await asyncio.gather(*(collect(lp.engine, p, params) for p, params in cases),
                                    *(collect(lp.engine, p, plain) for p in plain_prompts))
    results = lp.run(main())
    for (tokens, text, last), (_, params) in zip(results, cases):
        assert last.finish_reason == "stop", f"ran out of tokens: {text!r}"
        validate(text)
    assert [tokens for tokens, _, _ in results[len(cases):]] == alone, "unconstrained rows changed"


def _alone(lp: Loop, plain_prompts):
    plain = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    return [lp.run(collect(lp.engine, p, plain))[0] for p in plain_prompts]


def test_generated_json_schemas_always_give_valid_json(llama, plain_prompts):
    with Loop() as lp:
        lp.engine = make_engine(llama, kv_cache_tokens=4096)
        alone = _alone(lp, plain_prompts)

        @PROPERTY
        @given(schema=SCHEMAS, temperature=st.sampled_from([0.0, 0.7, 1.5]), seed=st.integers(0, 2**16))
        def check(schema, temperature, seed):
            text = json.dumps(schema)
            cases = [(p, constrained("json", text, temperature, seed + i)) for i, p in
                     enumerate(random_prompts(2, [3, 8], seed=seed))]
            _check_batch(lp, cases, plain_prompts, alone,
                         lambda out: jsonschema.validate(json.loads(out), schema))
        check()
        assert_all_blocks_free(lp.engine)


def test_generated_regexes_and_choices_always_match(llama, plain_prompts):
    with Loop() as lp:
        lp.engine = make_engine(llama, kv_cache_tokens=4096)
        alone = _alone(lp, plain_prompts)

        @PROPERTY
        @given(regex=REGEXES, choices=CHOICES, temperature=st.sampled_from([0.0, 1.0]), seed=st.integers(0, 2**16))
        def check(regex, choices, temperature, seed):
            prompts = random_prompts(2, [3, 8], seed=seed)
            cases = [(prompts[0], constrained("regex", regex, temperature, seed)),
                     (prompts[1], constrained("choice", json.dumps(choices), temperature, seed))]
            outputs = iter([lambda out: re.fullmatch(regex, out) or pytest.fail(f"{out!r} !~ {regex}"),
                            lambda out: out in choices or pytest.fail(f"{out!r} not in {choices}")])
            _check_batch(lp, cases, plain_prompts, alone, lambda out: next(outputs)(out))
        check()


def test_a_lark_grammar_is_followed_under_penalties_and_logit_bias(llama):
    engine = make_engine(llama, kv_cache_tokens=4096)
    grammar = 'start: "(" num ("+" num)* ")"\nnum: /[1-9][0-9]{0,2}/'
    params = SamplingParams(max_tokens=200, temperature=0.9, seed=5, repetition_penalty=1.3, presence_penalty=1.0,
                            frequency_penalty=0.5, logit_bias={"7": 100, "8": -100}, top_k=20, top_p=0.9, min_p=0.01,
                            structured_output=StructuredOutput("grammar", grammar))

    async def main():
        return await asyncio.gather(*(collect(engine, p, params) for p in random_prompts(4, [4, 9], seed=2)))
    for tokens, text, last in asyncio.run(main()):
        assert last.finish_reason == "stop"
        assert re.fullmatch(r"\((?:[1-9][0-9]{0,2}\+)*[1-9][0-9]{0,2}\)", text), text


def test_min_tokens_never_leaves_a_row_without_a_token(llama):
    # The choice completes after a few tokens, when only EOS is allowed, which min_tokens bans: the grammar wins.
    engine = make_engine(llama, kv_cache_tokens=2048)
    params = SamplingParams(max_tokens=50, min_tokens=40, temperature=0,
                            structured_output=StructuredOutput("choice", '["ab", "cd"]'))
    _, text, last = asyncio.run(collect(engine, [5, 6, 7], params))
    assert text in ("ab", "cd") and last.finish_reason == "stop"


def test_the_grammar_state_survives_preemption(llama):
    # Eight requests in a cache too small for all of them: some are preempted and recomputed mid-object.
    schema = json.dumps({"type": "object", "properties": {"items": {"type": "array", "items": {"type": "integer", "minimum": 100, "maximum": 999},
                                                                       "minItems": 12, "maxItems": 12}},
                         "required": ["items"], "additionalProperties": False})
    prompts = random_prompts(8, [30, 40], seed=9)
    params = SamplingParams(max_tokens=120, temperature=0, structured_output=StructuredOutput("json", schema))

    def outputs(**kw):
        engine = make_engine(llama, max_batch_size=8, **kw)

        async def main():
            return await asyncio.gather(*(collect(engine, p, params) for p in prompts))
        results = asyncio.run(main())
        return engine, [(tokens, text) for tokens, text, _ in results]
    _, roomy = outputs(kv_cache_tokens=4096)
    tight_engine, tight = outputs(kv_cache_tokens=256, block_size=16)
    assert tight_engine.core.scheduler.num_preemptions > 0, "the test needs preemptions"
    assert tight == roomy
    for _, text in tight:
        assert len(json.loads(text)["items"]) == 12
    assert_all_blocks_free(tight_engine)


def test_prefix_cached_and_lora_rows_follow_their_grammars(llama, peft_adapters):
    engine = make_engine(llama, kv_cache_tokens=4096, loras=[("alpha", peft_adapters["alpha"])])
    prompt = random_prompts(1, [48], seed=4)[0]
    params = constrained("regex", r"[a-z]{2,6}-[0-9]{2}", 0.0, 0)

    async def adapter_run():
        tokens, text, last = [], "", None
        async for out in engine.generate(prompt, params, None, "alpha"):
            tokens, text, last = tokens + out.token_ids, text + out.text, out
        return tokens, text, last

    async def main():
        first = await collect(engine, prompt, params)   # the next two reuse its prompt's blocks
        return [first, *await asyncio.gather(collect(engine, prompt, params), adapter_run())]
    results = asyncio.run(main())
    for tokens, text, last in results:
        assert re.fullmatch(r"[a-z]{2,6}-[0-9]{2}", text), text
    assert results[1][0] == results[0][0]
    assert results[1][2].num_cached_tokens >= 32


@pytest.mark.parametrize("kind, spec, needle", [
    ("json", '{"type": "objectx"}', "Invalid type"),
    ("json", "{not json", "not valid JSON"),
    ("json", "[1, 2]", "must be an object"),
    ("regex", "a(b", "unclosed group"),
    ("choice", '["a", 1]', "non-empty strings"),
    ("choice", "[]", "non-empty strings"),
    ("grammar", "start: foo", "unknown name"),
])
def test_a_spec_that_does_not_compile_is_refused_naming_its_field_before_any_step(llama, kind, spec, needle):
    engine = make_engine(llama, kv_cache_tokens=2048)
    params = SamplingParams(max_tokens=5, structured_output=StructuredOutput(kind, spec, field="response_format"))
    with pytest.raises(InvalidRequestError, match=needle) as e:
        asyncio.run(collect(engine, [5, 6], params))
    assert e.value.param == "response_format" and str(e.value).startswith("response_format: ")
    assert engine.core.num_steps == 0
    assert_all_blocks_free(engine)


def test_structured_output_params_are_checked():
    with pytest.raises(InvalidRequestError, match="kind must be one of"):
        StructuredOutput("yaml", "x")
    with pytest.raises(InvalidRequestError, match="at most"):
        StructuredOutput("regex", "a" * (300 * 1024))
    with pytest.raises(InvalidRequestError, match="non-empty"):
        StructuredOutput("regex", " ")
    assert SamplingParams(structured_output={"kind": "regex", "spec": "a+"}).structured_output == StructuredOutput("regex", "a+")
    with pytest.raises(InvalidRequestError, match="takes field, kind, spec"):
        SamplingParams(structured_output={"kind": "regex", "spec": "a+", "x": 1})


def test_a_spec_compiles_once_off_the_loop_and_a_slow_compile_holds_up_no_one(llama, monkeypatch):
    engine = make_engine(llama, kv_cache_tokens=2048)
    compiled, threads = [], []
    real = structured_output.GrammarCompiler._compile

    def slow(self, spec):
        compiled.append(spec.spec)
        threads.append(threading.current_thread().name)
        time.sleep(1.0)
        return real(self, spec)
    monkeypatch.setattr(structured_output.GrammarCompiler, "_compile", slow)
    params = constrained("regex", r"[a-z]{3}", 0.0, 0)

    async def main():
        start = time.monotonic()
        waiting = [asyncio.create_task(collect(engine, [5 + i, 6], params)) for i in range(3)]
        await asyncio.sleep(0.05)
        await collect(engine, [9, 10], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
        unconstrained_done = time.monotonic() - start
        return unconstrained_done, await asyncio.gather(*waiting)
    unconstrained_done, results = asyncio.run(main())
    assert unconstrained_done < 0.8, "the unconstrained request waited for another request's grammar"
    assert compiled == [r"[a-z]{3}"] and threads[0].startswith("lmserve-grammar")
    assert all(re.fullmatch("[a-z]{3}", text) for _, text, _ in results)


def test_masks_keep_exactly_the_allowed_tokens():
    import ctypes

    class Matcher:   # allows the token ids in `allowed`
        def __init__(self, allowed):
            self.allowed = allowed

        def unsafe_compute_mask_ptr(self, ptr, nbytes):
            words = torch.zeros(nbytes // 4, dtype=torch.int64)
            for t in self.allowed:
                words[t // 32] |= 1 << (t % 32)
            torch.frombuffer((ctypes.c_int32 * (nbytes // 4)).from_address(ptr), dtype=torch.int32).copy_(
                torch.where(words >= 2**31, words - 2**32, words).to(torch.int32))
    logits = torch.randn(3, 70)
    before = logits.clone()
    apply_bitmasks(logits, [0], fill_bitmasks([Matcher([0, 31, 32, 69])], 70))
    assert torch.isfinite(logits[0]).nonzero().view(-1).tolist() == [0, 31, 32, 69]
    assert torch.equal(logits[0, [0, 31, 32, 69]], before[0, [0, 31, 32, 69]])
    assert torch.equal(logits[1:], before[1:])
    logits[2, :] = -float("inf")   # nothing left after other bans: the grammar's set, evenly
    apply_bitmasks(logits, [2], fill_bitmasks([Matcher([5, 6])], 70))
    assert logits[2, 5] == logits[2, 6] == 0 and torch.isinf(logits[2]).sum() == 68


def test_a_grammar_armed_after_a_token_leaves_the_output_free_until_it(llama):
    # As for a reasoning model's </think>: the first token (pushed by logit_bias) is free, then the regex rules.
    engine = make_engine(llama, kv_cache_tokens=2048)
    think_end = engine.tokenizer.encode(".", add_special_tokens=False)[0]
    params = SamplingParams(max_tokens=40, temperature=0, logit_bias={str(think_end): 100},
                            structured_output=StructuredOutput("regex", "[0-9]{3}", start_after=think_end))
    tokens, _, last = asyncio.run(collect(engine, [5, 6, 7], params))
    assert tokens[0] == think_end and last.finish_reason == "stop"
    assert re.fullmatch("[0-9]{3}", engine.tokenizer.decode(tokens[1:]))


def test_a_request_aborted_while_its_grammar_compiles_leaves_nothing_behind(llama, monkeypatch):
    engine = make_engine(llama, kv_cache_tokens=2048, max_queued_requests=1)
    real = structured_output.GrammarCompiler._compile
    monkeypatch.setattr(structured_output.GrammarCompiler, "_compile", lambda self, spec: time.sleep(0.5) or real(self, spec))

    async def main():
        task = asyncio.create_task(collect(engine, [5, 6], constrained("regex", "[a-z]{4}", 0.0, 0)))
        await asyncio.sleep(0.1)
        assert engine.core.num_queued == 1   # a request waiting for its grammar holds a place in the queue
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.6)             # the compile finishes; nothing is admitted for the gone request
        assert engine.core.num_queued == 0 and not engine.core._seqs
        return await collect(engine, [7, 8], constrained("regex", "[a-z]{4}", 0.0, 0))   # the cached grammar
    _, text, _ = asyncio.run(main())
    assert re.fullmatch("[a-z]{4}", text)
    assert_all_blocks_free(engine)
