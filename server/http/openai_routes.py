"""OpenAI-compatible /v1/completions and /v1/chat/completions: translate, call engine.generate, translate back.

Each (prompt, copy) pair is one engine request. All of them are started and their first delta awaited
before any response is sent, so a bad request is a 400, never a broken stream. A request asks for at most
max_choices (prompts x n) completions, and each counts against its API key's rate limit. A client that goes
away aborts its requests, from arrival on: while they wait to start through a watcher, then streaming
through the response's cancellation, non-streaming through the watcher again.
"""
import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field

from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse

from server.engine_client import EngineClient
from server.errors import ModelNotFoundError, RequestFailedError, ServerBusyError
from server.http.protocol import (DEFAULT_MAX_CHOICES, RATE_CHARGE, ApiError, engine_refusal, model_not_found,
                                  parse_chat, parse_completion)
from server.outputs import RequestOutput
from server.http.assistant_turn import AssistantTurn, constrained_params
from server.reasoning import END as REASONING_END
from server.reasoning import ReasoningParser
from server.sampling import InvalidRequestError, SamplingParams
from server.tokenizer import template_knows_tools
from server.tool_calls import make_parser, parser_for_template, prompt_messages


@dataclass
class Choice:
    """One engine request's accumulated output."""
    index: int
    prompt: str | list[int]
    params: SamplingParams
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    prompt_logprobs: list | None = None
    prompt_token_ids: list[int] | None = None
    last: RequestOutput | None = None

    def add(self, out: RequestOutput):
        self.text += out.text
        self.token_ids += out.token_ids
        self.logprobs += out.logprobs or []
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        if out.prompt_token_ids is not None:
            self.prompt_token_ids = out.prompt_token_ids
        self.last = out


class OpenAIRoutes:
    def __init__(self, engine: EngineClient, model_name: str, max_choices: int = DEFAULT_MAX_CHOICES,
                 tool_call_parser: str = "auto", reasoning_parser: str | None = None):
        self.engine = engine
        self.model_name = model_name
        self.tokenizer = engine.tokenizer
        self.max_choices = max_choices
        self.template_knows_tools = template_knows_tools(self.tokenizer)
        self.tool_parser = (parser_for_template(self.tokenizer.chat_template) if tool_call_parser == "auto"
                            else tool_call_parser)
        self.reasoning = ReasoningParser(reasoning_parser) if reasoning_parser else None
        # A grammar waits for the end of the reasoning, where that is one token (else it applies from the start).
        think_end = self.tokenizer.encode(REASONING_END, add_special_tokens=False)
        self.think_end = think_end[0] if len(think_end) == 1 else None

    # --- /v1/completions ------------------------------------------------------------------------
    async def completions(self, request: Request, body: dict):
        req = parse_completion(body)
        adapter = await self._adapter_for(req.model)
        self._admit(request, len(req.prompts), req.n)
        choices = [Choice(i * req.n + j, p, _copy_params(req.params, i * req.n + j))
                   for i, p in enumerate(req.prompts) for j in range(req.n)]
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        streams = await until_disconnect(request, self._start(rid, choices, adapter, req.parse_special_tokens))

        def choice_body(c: Choice, text: str, finish: str | None, logprobs=None) -> dict:
            return {"index": c.index, "text": text, "logprobs": logprobs, "finish_reason": finish}

        def head(obj: str) -> dict:
            return {"id": rid, "object": obj, "created": created, "model": req.model or self.model_name}

        if req.stream:
            async def chunks():
                if req.echo:
                    for c in choices:
                        yield head("text_completion") | {"choices": [choice_body(c, self._prompt_text(c.prompt), None)]}
                async for c, out in self._pump(choices, streams):
                    lp = self._completion_logprobs(out.logprobs, len(c.text) - len(out.text)) if out.logprobs is not None else None
                    yield head("text_completion") | {"choices": [choice_body(c, out.text, out.finish_reason, lp)]}
                if req.include_usage:
                    yield head("text_completion") | {"choices": [], "usage": self._usage(choices, req.n)}
            return sse_response(chunks(), streams)

        await self._collect(request, choices, streams)
        result = []
        for c in choices:
            text, scored = c.text, c.logprobs
            if req.echo:
                prompt_text = self._prompt_text(c.prompt)
                text = prompt_text + text
                if c.params.logprobs is not None:
                    scored = (c.prompt_logprobs or []) + c.logprobs
            logprobs = None
            if c.params.logprobs is not None:
                logprobs = self._completion_logprobs(scored, 0, c.prompt_token_ids[0] if req.echo else None)
            result.append(choice_body(c, text, c.last.finish_reason, logprobs))
        return JSONResponse(head("text_completion") | {"choices": result, "usage": self._usage(choices, req.n)})

    # --- /v1/chat/completions -------------------------------------------------------------------
    async def chat(self, request: Request, body: dict):
        req = parse_chat(body)
        adapter = await self._adapter_for(req.model)
        self._admit(request, 1, req.n)
        parser = make_parser(self.tool_parser, [t.name for t in req.tools]) if req.tool_choice != "none" else None
        messages, tools = prompt_messages(req.messages, req.tools if parser else [], self.template_knows_tools)
        try:
            prompt_ids = await self.engine.tokenize_chat(messages, tools)
        except InvalidRequestError as e:
            raise engine_refusal(e) from None
        except ValueError as e:
            raise ApiError(400, str(e), "messages") from None
        except Exception as e:  # a template that raises on these messages (jinja2 errors, role checks)
            raise ApiError(400, f"the chat template could not render these messages: {e}", "messages") from None
        params = constrained_params(req, req.params, self.tool_parser, self.think_end if self.reasoning else None)
        turn = AssistantTurn(parser, self.reasoning, req.parallel_tool_calls)
        choices = [Choice(j, prompt_ids, _copy_params(params, j)) for j in range(req.n)]
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        streams = await until_disconnect(request, self._start(rid, choices, adapter))

        def head(obj: str) -> dict:
            return {"id": rid, "object": obj, "created": created, "model": req.model or self.model_name}

        if req.stream:
            async def chunks():
                for c in choices:
                    yield head("chat.completion.chunk") | {"choices": [
                        {"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                         "finish_reason": None}]}
                shapers = {c.index: turn.stream() for c in choices}
                async for c, out in self._pump(choices, streams):
                    lp = {"content": self._chat_logprobs(out.logprobs)} if req.logprobs else None
                    deltas = shapers[c.index].feed(out.text, out.finished, out.finish_reason)
                    if lp and not deltas:   # text held back (a call may be starting): its logprobs still go out
                        deltas = [({"content": ""}, None)]
                    for i, (delta, finish) in enumerate(deltas):
                        yield head("chat.completion.chunk") | {"choices": [
                            {"index": c.index, "delta": delta, "logprobs": lp if i == 0 else None,
                             "finish_reason": finish}]}
                if req.include_usage:
                    yield head("chat.completion.chunk") | {"choices": [], "usage": self._usage(choices, req.n)}
            return sse_response(chunks(), streams)

        await self._collect(request, choices, streams)
        result = []
        for c in choices:
            message, finish = turn.message(c.text, c.last.finish_reason)
            result.append({"index": c.index, "message": message, "finish_reason": finish,
                           "logprobs": {"content": self._chat_logprobs(c.logprobs)} if req.logprobs else None})
        return JSONResponse(head("chat.completion") | {"choices": result, "usage": self._usage(choices, req.n)})

    # --- running engine requests ----------------------------------------------------------------
    async def _start(self, rid: str, choices: list[Choice], adapter: str | None, parse_special_tokens: bool = False):
        """Start every engine request and take its first delta; on any refusal close them all and raise."""
        if len(choices) > 1:
            try:
                await self.engine.check_capacity(len(choices))   # a full queue refuses the request once, not per choice
            except ServerBusyError as e:
                raise engine_refusal(e) from None
        token_ids: dict[str, list[int]] = {}   # each distinct text prompt tokenized once, however many copies
        try:
            for c in choices:
                if isinstance(c.prompt, str) and c.prompt and c.prompt not in token_ids:
                    token_ids[c.prompt] = await self.engine.tokenize(c.prompt, parse_special_tokens=parse_special_tokens)
        except InvalidRequestError as e:
            raise engine_refusal(e) from None
        streams = [self.engine.generate(token_ids.get(c.prompt, c.prompt) if isinstance(c.prompt, str) else c.prompt,
                                        c.params, f"{rid}-{c.index}", adapter, parse_special_tokens)
                   for c in choices]
        firsts = await asyncio.gather(*(anext(s) for s in streams), return_exceptions=True)
        errors = [e for e in firsts if isinstance(e, BaseException)]
        if errors:
            await asyncio.gather(*(s.aclose() for s in streams), return_exceptions=True)
            e = errors[0]
            refusal = engine_refusal(e)   # bad input, unknown (or just unloaded) model, a full queue, ...
            if refusal is not None:
                raise refusal from None
            raise e
        for c, first in zip(choices, firsts):
            c.add(first)
        return streams

    async def _collect(self, request: Request, choices: list[Choice], streams):
        async def drain(c: Choice, stream):
            if not c.last.finished:
                async for out in stream:
                    c.add(out)
        try:
            await until_disconnect(request, asyncio.gather(*(drain(c, s) for c, s in zip(choices, streams))))
        finally:
            await asyncio.gather(*(s.aclose() for s in streams), return_exceptions=True)

    async def _pump(self, choices: list[Choice], streams):
        """Yield (choice, delta) as they arrive from all engine requests, starting with the primed first deltas."""
        queue: asyncio.Queue = asyncio.Queue()

        async def forward(c: Choice, stream):
            try:
                if not c.last.finished:
                    async for out in stream:
                        c.add(out)
                        await queue.put((c, out))
            finally:
                await queue.put((c, None))
        for c in choices:
            yield c, c.last
        if len(choices) == 1:  # the common case: one engine stream, read directly
            (c,), (stream,) = choices, streams
            if not c.last.finished:
                async for out in stream:
                    c.add(out)
                    yield c, out
            return
        tasks = [asyncio.ensure_future(forward(c, s)) for c, s in zip(choices, streams)]
        try:
            remaining = len(tasks)
            while remaining:
                c, out = await queue.get()
                if out is None:
                    remaining -= 1
                else:
                    yield c, out
            for t in tasks:
                t.result()
        finally:
            for t in tasks:
                t.cancel()

    def _admit(self, request: Request, prompts: int, n: int):
        """400 past max_choices completions; each one past the first also takes a turn of the key's rate limit."""
        if prompts * n > self.max_choices:
            raise ApiError(400, f"this request asks for {prompts * n} completions ({prompts} prompts x n={n}); "
                                f"at most {self.max_choices} are allowed per request (--max-choices-per-request)",
                           "prompt" if prompts > 1 else "n", code="too_many_choices")
        charge = request.scope.get(RATE_CHARGE)
        if charge is not None and prompts * n > 1:
            charge(prompts * n - 1)   # raises the 429 when the key's limit cannot cover them

    # --- shaping --------------------------------------------------------------------------------
    async def _adapter_for(self, model: str) -> str | None:
        """The LoRA adapter a request's model names (None: the base model); 404 for anything not served."""
        try:
            return await self.engine.check_model(model)
        except ModelNotFoundError as e:
            raise model_not_found(str(e)) from None

    def _prompt_text(self, prompt) -> str:
        return prompt if isinstance(prompt, str) else self.tokenizer.decode(prompt, skip_special_tokens=False)

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def _completion_logprobs(self, scored: list, offset: int, first_prompt_token: int | None = None) -> dict:
        """OpenAI's completions logprobs; with echo, scored starts with None for the unscored first prompt token."""
        tokens, token_logprobs, top, offsets = [], [], [], []
        for s in scored:
            token_id = first_prompt_token if s is None else s.token_id
            text = self._token_text(token_id)
            tokens.append(text)
            token_logprobs.append(None if s is None else s.logprob)
            top.append(None if s is None else self._top_by_text(s.top_logprobs))
            offsets.append(offset)
            offset += 0 if token_id in self.tokenizer.all_special_ids else len(text)  # BOS is not in the echoed text
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}

    def _top_by_text(self, top_logprobs: dict[int, float]) -> dict[str, float]:
        """Completions' top_logprobs, keyed by text as OpenAI's are; an alternative whose text an earlier (more
        likely) one already has is keyed "TEXT [token ID]", so none is lost."""
        out: dict[str, float] = {}
        for token_id, logprob in top_logprobs.items():
            text = self._token_text(token_id)
            out[f"{text} [token {token_id}]" if text in out else text] = logprob
        return out

    def _chat_logprobs(self, scored: list) -> list[dict]:
        def entry(token_id: int, logprob: float) -> dict:
            text = self._token_text(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}
        return [entry(s.token_id, s.logprob) | {"top_logprobs": [entry(t, lp) for t, lp in s.top_logprobs.items()]}
                for s in scored]

    def _usage(self, choices: list[Choice], n: int) -> dict:
        firsts = choices[::n]   # the prompt is counted once per prompt, not once per copy
        prompt = sum(c.last.num_prompt_tokens for c in firsts)
        completion = sum(c.last.num_output_tokens for c in choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": sum(c.last.num_cached_tokens for c in firsts)}}


def _copy_params(params: SamplingParams, index: int) -> SamplingParams:
    """The params for copy `index`: a seeded request seeds each copy differently, and reproducibly."""
    copy = SamplingParams(**params.__dict__)
    if params.seed is not None:
        copy.seed = params.seed + index
    return copy


async def until_disconnect(request: Request, work):
    """work's result, unless the client goes away first: then work is cancelled and a 499 ApiError raised.

    The request body must have been read already."""
    async def disconnected():
        while (await request.receive())["type"] != "http.disconnect":
            pass
    work, watcher = asyncio.ensure_future(work), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not work.done():
            work.cancel()
            # what the cancelled work ends with (an abort's error, say) is of no interest: retrieve it quietly
            work.add_done_callback(lambda f: f.cancelled() or f.exception())
            raise ApiError(499, "client disconnected", type_="client_disconnected")
        return work.result()
    finally:
        watcher.cancel()


def sse_response(chunks, streams) -> StreamingResponse:
    """Server-sent events of the JSON chunks, then [DONE]; closing early closes the engine streams (abort)."""
    async def events():
        try:
            try:
                async for chunk in chunks:
                    yield f"data: {json.dumps(chunk)}\n\n"
            except RequestFailedError as e:  # the headers are sent: the error goes in the stream, as OpenAI's do
                yield f"data: {json.dumps(engine_refusal(e).body())}\n\n"
            yield "data: [DONE]\n\n"
        finally:  # a disconnected client lands here: closing the engine streams aborts their requests
            await chunks.aclose()
            await asyncio.gather(*(s.aclose() for s in streams), return_exceptions=True)
    return StreamingResponse(events(), media_type="text/event-stream")
