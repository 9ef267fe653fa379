"""EngineClient: the one interface every frontend uses (generate, abort, health, tokenize, models, adapters,
metrics, drain); its API-process half tokenizes prompts, detokenizes outputs and checks stop strings.

Two implementations share that half and differ in where the engine core runs: InProcessEngineClient drives an
EngineCore on the API's own event loop (tests, debugging); MultiprocessEngineClient
(server/mp_engine_client.py) talks to an engine core process over its socket, the default for python -m server.
"""
import asyncio
import functools
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator

from batching.limits import check_prompt
from batching.messages import AdapterInfo, Abort, AddRequest, CoreOutput, EngineInfo
from batching.sequence import FinishReason
from server.errors import (EngineDeadError, ModelNotFoundError, RequestFailedError, ShutdownAbortError,
                           ShuttingDownError, error_from_wire)
from server.metrics import render_process_metrics
from server.outputs import RequestOutput, StopStringMatcher
from server.redact import mask_pii
from server.sampling import InvalidRequestError, SamplingParams
from server.tokenizer import IncrementalDetokenizer, encode_chat, load_tokenizer

_INLINE_TOKENIZE_CHARS = 4096   # shorter texts are tokenized on the event loop: a thread hop costs more
_MESSAGE_CHARS = 16             # a chat message's share of the template, counted against the prompt bound
request_log = logging.getLogger("lmserve.requests")   # --log-requests: prompts and outputs, personal data masked
log = logging.getLogger(__name__)


@dataclass(eq=False)
class _RequestState:
    """One request as its API process follows it: the stream's queue, its text so far, its counters."""
    request_id: str
    wire_id: str                     # its id on the engine socket (see EngineClient._wire_id)
    prompt_token_ids: list[int]
    params: SamplingParams
    queue: asyncio.Queue
    detokenizer: IncrementalDetokenizer
    stop_matcher: StopStringMatcher
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    last_token: int | None = None


class EngineClient:
    """What frontends call. Subclasses say how requests, aborts and calls reach the engine core."""

    def __init__(self, info: EngineInfo, log_requests: bool = False):
        self.model_name = info.model_name
        self.model_path = info.model_path
        self.max_model_len = info.max_model_len
        self.vocab_size = info.vocab_size
        self.kv_cache_tokens = info.kv_cache_tokens
        self.tokenizer = load_tokenizer(info.model_path)
        self.max_prompt_chars = self.max_model_len * _longest_token_chars(self.tokenizer)
        self.log_requests = log_requests
        self._requests: dict[str, _RequestState] = {}       # by the client's request id
        self._by_wire_id: dict[str, _RequestState] = {}    # the same, by their ids on the engine socket
        self._starting: set[str] = set()   # ids of requests between arrival and registration (tokenizing, ...)
        self.draining = False
        self.failure: BaseException | None = None   # why the engine core stopped, once it has
        self.on_loop_death = None                   # called with that exception (the server exits non-zero)

    # --- how a subclass reaches the core --------------------------------------------------------
    def _send_add(self, req: AddRequest):
        raise NotImplementedError

    def _send_abort(self, abort: Abort):
        raise NotImplementedError

    async def call(self, method: str, *args):
        """One of EngineCore.CALLS, answered by the core."""
        raise NotImplementedError

    # --- generate -------------------------------------------------------------------------------
    async def generate(self, prompt: str | list[int], params: SamplingParams | None = None,
                       request_id: str | None = None, adapter: str | None = None,
                       parse_special_tokens: bool = False) -> AsyncIterator[RequestOutput]:
        """Yields deltas until one with finished=True. Leaving the iteration early aborts the request.
        adapter: the name of a loaded LoRA adapter to run with; None runs the base model.
        parse_special_tokens: let control-token strings in a text prompt become control tokens."""
        request_id = request_id or uuid.uuid4().hex
        if not isinstance(request_id, str) or request_id in self._requests or request_id in self._starting:
            raise InvalidRequestError(f"request_id {request_id!r} is already in use", "request_id")
        params = params or SamplingParams()
        self._starting.add(request_id)   # held across the awaits below, so a second request cannot take the id
        try:
            self._check_open()
            if isinstance(prompt, str):
                if not prompt:
                    raise InvalidRequestError("prompt must not be empty", "prompt")
                prompt = await self.tokenize(prompt, parse_special_tokens=parse_special_tokens)
            prompt = list(prompt)
            check_prompt(prompt, params, self.vocab_size, self.max_model_len, self.kv_cache_tokens)
            self._check_open()
            state = _RequestState(request_id, self._wire_id(request_id), prompt, params, asyncio.Queue(),
                                  IncrementalDetokenizer(self.tokenizer, prompt, params.skip_special_tokens),
                                  StopStringMatcher(params.stop, params.include_stop_str_in_output))
            self._requests[request_id] = state
            self._by_wire_id[state.wire_id] = state
        finally:
            self._starting.discard(request_id)
        try:
            self._send_add(AddRequest(state.wire_id, prompt, params, adapter or None, time.monotonic()))
        except BaseException:
            self._forget(state)
            raise
        try:
            while True:
                out = await state.queue.get()
                if isinstance(out, BaseException):
                    raise out
                yield out
                if out.finished:
                    return
        finally:
            if self._requests.get(request_id) is state:
                self.abort(request_id)

    def _check_open(self):
        if self.failure is not None:
            raise EngineDeadError(f"the server is shutting down: the engine stopped: {self.failure}")
        if self.draining:
            raise ShuttingDownError("the server is shutting down and takes no new requests")

    def _wire_id(self, request_id: str) -> str:
        """The id a request goes by on the engine socket: the client's own here; unique per process where the
        core is shared and outputs arrive late (MultiprocessEngineClient), so a reused id never gets another's."""
        return request_id

    def _forget(self, state: _RequestState):
        if self._requests.get(state.request_id) is state:
            del self._requests[state.request_id]
        self._by_wire_id.pop(state.wire_id, None)

    def abort(self, request_id: str):
        """Ends the request now and frees its KV blocks; its stream gets a final 'abort' delta."""
        state = self._requests.get(request_id)
        if state is None:
            return
        self._forget(state)
        self._send_abort(Abort([state.wire_id]))
        state.queue.put_nowait(self._output(state, [], [] if state.params.logprobs is not None else None, "", "abort"))

    def abort_all(self, why: str):
        """Ends every request in flight now with a ShutdownAbortError that says why; their blocks are freed."""
        states = list(self._requests.values())
        if states:
            self._send_abort(Abort([state.wire_id for state in states]))
        for state in states:
            self._forget(state)
            state.queue.put_nowait(ShutdownAbortError(f"request {state.request_id} was aborted: {why}"))

    def _fail_all(self, error: Exception):
        """The engine core stopped: every request in flight ends with error, at once."""
        for state in list(self._requests.values()):
            self._forget(state)
            state.queue.put_nowait(EngineDeadError(f"request {state.request_id} failed: {error}"))

    # --- outputs from the core ------------------------------------------------------------------
    def _process(self, outputs: list[CoreOutput]):
        """One step's outputs: text deltas into each request's stream; a stop string found ends it."""
        stopped = []
        for o in outputs:
            state = self._by_wire_id.get(o.request_id)
            if state is None:   # ended here already (aborted, stop string); the core learns it or has
                continue
            try:
                if self._deliver(state, o):
                    stopped.append(o.request_id)
            except Exception as e:  # this request's output cannot be made: it fails, the others go on
                log.exception("the output of request %s failed", state.request_id)
                self._forget(state)
                self._send_abort(Abort([o.request_id]))
                state.queue.put_nowait(RequestFailedError(
                    f"request {state.request_id} failed: detokenizing token {o.token_ids}: {type(e).__name__}: {e}"))
        if stopped:
            self._send_abort(Abort(stopped, reason="stop"))

    def _deliver(self, state: _RequestState, o: CoreOutput) -> bool:
        """Puts one output's delta in the request's stream; True when a stop string ended it here."""
        if o.error is not None:
            self._forget(state)
            message = o.error.message.replace(o.request_id, state.request_id)
            state.queue.put_nowait(error_from_wire(o.error.kind, message, o.error.param))
            return False
        finish = o.finish_reason
        if state.num_output_tokens == 0:
            state.num_cached_tokens = o.num_cached_tokens
        state.num_output_tokens += len(o.token_ids)
        if o.token_ids:
            state.last_token = o.token_ids[-1]
        state.detokenizer.step(o.token_ids, final=finish is not None)
        text = state.stop_matcher.feed(state.detokenizer.text, final=finish is not None)
        stopped = state.stop_matcher.matched is not None and finish is None
        if stopped:
            finish = "stop"
            text += state.stop_matcher.feed(state.detokenizer.text, final=True)
        out = self._output(state, o.token_ids, o.logprobs, text, finish)
        if state.num_output_tokens == len(o.token_ids):
            out.prompt_token_ids = state.prompt_token_ids
            out.prompt_logprobs = o.prompt_logprobs
        if finish is not None:
            self._forget(state)
            if self.log_requests:
                request_log.info("request %s finished (%s): prompt %r output %r", state.request_id, finish,
                                 mask_pii(self.tokenizer.decode(state.prompt_token_ids)),
                                 mask_pii(state.detokenizer.text))
        state.queue.put_nowait(out)
        return stopped

    def _output(self, state: _RequestState, token_ids, logprobs, text, finish: str | None) -> RequestOutput:
        stop_reason = None
        if finish == "stop":
            last = state.last_token
            stop_reason = state.stop_matcher.matched or (last if last in state.params.stop_token_ids else None)
        return RequestOutput(
            request_id=state.request_id, token_ids=token_ids, text=text, logprobs=logprobs,
            finished=finish is not None, finish_reason=finish, num_prompt_tokens=len(state.prompt_token_ids),
            num_cached_tokens=state.num_cached_tokens, num_output_tokens=state.num_output_tokens,
            stop_reason=stop_reason)

    # --- tokenizing -----------------------------------------------------------------------------
    async def tokenize(self, text: str, add_special_tokens: bool = True, parse_special_tokens: bool = False,
                       param: str = "prompt") -> list[int]:
        """A text's token ids. A text too long to fit the context whatever its tokens is refused before any
        tokenizing, and a long one is tokenized on a worker thread, so one big prompt never stalls the others.
        Control-token strings in it stay text unless parse_special_tokens."""
        return await self._encode_bounded(len(text), param, functools.partial(
            self.tokenizer.encode, text, add_special_tokens=add_special_tokens,
            split_special_tokens=not parse_special_tokens))

    async def tokenize_chat(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """A chat prompt's token ids (server/tokenizer.py encode_chat), bounded and off the loop as tokenize();
        tools: OpenAI tool definitions for a template that renders them."""
        # each message costs the template some characters of its own, whatever its content
        chars = sum(_MESSAGE_CHARS + sum(len(m[k]) for k in ("content", "name") if isinstance(m.get(k), str))
                    + (len(json.dumps(m["tool_calls"])) if m.get("tool_calls") else 0) for m in messages)
        chars += len(json.dumps(tools)) if tools else 0
        return await self._encode_bounded(chars, "messages",
                                          functools.partial(encode_chat, self.tokenizer, messages, True, tools))

    async def _encode_bounded(self, chars: int, param: str, encode) -> list[int]:
        if chars > self.max_prompt_chars:
            raise InvalidRequestError(
                f"the prompt has {chars} characters; no text over {self.max_prompt_chars} can fit this model's "
                f"maximum context length of {self.max_model_len} tokens", param)
        return encode() if chars < _INLINE_TOKENIZE_CHARS else await asyncio.to_thread(encode)

    def detokenize(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids)

    # --- models and adapters --------------------------------------------------------------------
    async def adapters(self) -> list[AdapterInfo]:
        return await self.call("adapters")

    async def check_model(self, name: str | None) -> str | None:
        """The adapter a request's model names (None: the base model); ModelNotFoundError for anything else."""
        if name is None or name == "" or name == self.model_name:
            return None
        adapters = [a.name for a in await self.adapters()]
        if name not in adapters:
            known = ", ".join([self.model_name, *adapters])
            raise ModelNotFoundError(f"the model {name!r} does not exist; this server serves {known}")
        return name

    async def load_adapter(self, name: str, path: str) -> AdapterInfo:
        return await self.call("load_adapter", name, path)

    async def unload_adapter(self, name: str):
        await self.call("unload_adapter", name)

    async def check_capacity(self, count: int = 1):
        """ServerBusyError, counted once, when count more requests would pass --max-queued-requests."""
        await self.call("check_capacity", count)

    async def metrics(self) -> bytes:
        """The engine's Prometheus text, then this API process's own gauges."""
        return await self.call("metrics") + render_process_metrics()

    # --- lifecycle ------------------------------------------------------------------------------
    @property
    def num_in_flight(self) -> int:
        return len(self._requests)

    def health(self) -> bool:
        return not self.draining and self.failure is None

    def start_draining(self):
        """Refuse new requests from now on (health turns false); the ones in flight go on."""
        self.draining = True

    async def wait_until_idle(self, timeout: float) -> bool:
        """True once no request is in flight; False if some still are after timeout seconds."""
        deadline = time.monotonic() + timeout
        while self._requests and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return not self._requests

    async def shutdown(self):
        raise NotImplementedError


class InProcessEngineClient(EngineClient):
    """The engine core on this process's event loop: one process, no socket (tests and debugging)."""

    def __init__(self, core):
        """core: a batching.core.EngineCore; in_process_engine(config) builds both."""
        self.core = core
        super().__init__(core.info(), core.config.log_requests)
        core.sink = self._process
        core.on_loop_death = self._on_core_death

    def _on_core_death(self, exc: BaseException):
        self.failure = exc
        if self.on_loop_death is not None:
            self.on_loop_death(exc)

    def _send_add(self, req: AddRequest):
        self.core.add_request(req)

    def _send_abort(self, abort: Abort):
        for request_id in abort.request_ids:
            self.core.abort(request_id, FinishReason(abort.reason))

    async def call(self, method: str, *args):
        return await self.core.call(method, *args)

    def health(self) -> bool:
        return super().health() and self.core.health()

    async def shutdown(self):
        await self.core.shutdown()


def in_process_engine(config) -> InProcessEngineClient:
    """An EngineCore for config, loaded here, behind an InProcessEngineClient."""
    from batching.core import EngineCore
    return InProcessEngineClient(EngineCore(config))


def _longest_token_chars(tokenizer) -> int:
    """The most characters one token can stand for (its vocabulary string has at least as many)."""
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return max(len(t) for t in tokens if isinstance(t, str))
