"""AsyncEngine: generate() -> async stream of deltas, abort(), health(); owns the step loop.

The step loop runs on the event loop: it admits sequences from the batcher, schedules, prepares the
batch, runs the model in a single worker thread (the loop stays responsive meanwhile), then records
tokens; it detokenizes them and pushes deltas to each request's queue while the next step runs.
"""
import asyncio
import functools
import logging
import random
import time
import uuid
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import AsyncIterator

import torch

from batching.batcher import DynamicBatcher
from batching.scheduler import Scheduler, SchedulerOutput
from server.config import EngineConfig
from server.cuda_graphs import build_decode_graphs
from server.host_memory import keep_freed_memory
from server.kv_cache import BlockManager, kv_cache_bytes_per_token, size_kv_cache
from server.loader import load_hf_config, load_model
from server.lora import LoRAAdapter, LoRAError, LoRAPool, load_adapter
from server.metrics import EngineMetrics
from server.model_runner import ModelRunner
from server.model_source import resolve_model
from server.outputs import RequestOutput, StopStringMatcher
from server.redact import mask_pii
from server.sampling import InvalidRequestError, SampledToken, SamplingParams
from server.sequence import FinishReason, Sequence, SequenceStatus
from server.tokenizer import IncrementalDetokenizer, encode_chat, eos_token_ids, load_tokenizer

_INLINE_TOKENIZE_CHARS = 4096   # shorter texts are tokenized on the event loop: a thread hop costs more
_MESSAGE_CHARS = 16             # a chat message's share of the template, counted against the prompt bound
request_log = logging.getLogger("lmserve.requests")   # --log-requests: prompts and outputs, personal data masked
log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Request:
    seq: Sequence
    queue: asyncio.Queue
    detokenizer: IncrementalDetokenizer
    stop_matcher: StopStringMatcher


class ModelNotFoundError(LookupError):
    """A request named a model or adapter this engine does not serve (404 / NOT_FOUND)."""


class ServerBusyError(RuntimeError):
    """--max-queued-requests are already waiting: refused at once (429 / RESOURCE_EXHAUSTED), retry later."""


class ShuttingDownError(RuntimeError):
    """The server is draining for shutdown and takes no new requests (503 / UNAVAILABLE)."""


class RequestFailedError(RuntimeError):
    """The engine ended this request before it finished (500 / INTERNAL); the message names it and says why."""


class ShutdownAbortError(RequestFailedError):
    """--shutdown-timeout passed while the request was in flight: ended (503 / UNAVAILABLE), the process exits."""


class RequestTimeoutError(RequestFailedError):
    """The request outlasted --request-timeout (408 / DEADLINE_EXCEEDED); its blocks are freed."""


class AsyncEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        source = resolve_model(config.model)
        self.model_path = source.path
        self.model_name = config.served_model_name or source.name
        hf_config = load_hf_config(self.model_path)
        self.device = _resolve_device(config.device)
        if self.device.type == "cpu":
            keep_freed_memory()
        self.dtype = _resolve_dtype(config.dtype, self.device, hf_config)
        self.tokenizer = load_tokenizer(self.model_path)
        self.eos_token_ids = eos_token_ids(self.model_path, hf_config, self.tokenizer)
        self.max_model_len = config.max_model_len or hf_config.max_position_embeddings
        self.max_prompt_chars = self.max_model_len * _longest_token_chars(self.tokenizer)
        if self.max_model_len > hf_config.max_position_embeddings:
            raise ValueError(f"max_model_len must be at most the model's max_position_embeddings "
                             f"({hf_config.max_position_embeddings}); got {self.max_model_len}")
        self.model = load_model(self.model_path, self.dtype, self.device, self.max_model_len, config.quant,
                                config.quant_group_size, config.kernels)
        if self.model.ops.name == "triton" and (config.block_size < 16 or config.block_size & (config.block_size - 1)):
            raise ValueError(f"block_size must be a power of two >= 16 with the Triton kernels; got {config.block_size}")
        mc = self.model.config
        self.vocab_size = mc.vocab_size
        per_token = kv_cache_bytes_per_token(mc.num_layers, mc.num_kv_heads, mc.head_dim, self.dtype)
        num_blocks = size_kv_cache(per_token, config.block_size, self.device, config.kv_cache_tokens,
                                   config.kv_cache_memory_fraction, config.max_batch_size * self.max_model_len,
                                   min_tokens=self.max_model_len)
        self.kv_cache_tokens = num_blocks * config.block_size
        # One block more than the BlockManager hands out: block tables are padded with it (ModelRunner), so
        # padding never reads a block another sequence writes (whose NaN would spread through 0 * NaN).
        kv_caches = [torch.zeros(2, num_blocks + 1, config.block_size, mc.num_kv_heads, mc.head_dim,
                                 dtype=self.dtype, device=self.device) for _ in range(mc.num_layers)]
        log.info("KV cache: %d blocks of %d tokens (%.1f MiB)", num_blocks, config.block_size,
                 per_token * self.kv_cache_tokens / 2**20)
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_batch_size, config.max_num_batched_tokens)
        self.batcher = DynamicBatcher(config.max_batch_size, config.max_wait_ms)
        self.lora_pool = LoRAPool(mc, config.max_loras, config.max_lora_rank, self.dtype, self.device,
                                  self.model.ops.add_lora)
        self.adapters: dict[str, LoRAAdapter] = {}
        self._next_adapter_id = 1
        for name, path in config.loras:
            self._register(load_adapter(name, path, mc, self._take_adapter_id(), config.max_lora_rank))
        for name, path in _adapters_in(config.lora_dir):
            if name in self.adapters:
                continue
            try:   # one bad adapter in the directory is skipped; the server serves the rest
                self._register(load_adapter(name, path, mc, self._take_adapter_id(), config.max_lora_rank,
                                            root=Path(config.lora_dir).resolve()))
            except LoRAError as e:
                log.error("--lora-dir: skipped adapter %r: %s", name, e)
        self.runner = ModelRunner(self.model, kv_caches, config.block_size, self.device, self.eos_token_ids,
                                  self.lora_pool)
        # bitsandbytes is left out: LLM.int8 picks its outlier columns per call (shapes that depend on the data),
        # and NF4 has not been tried in a graph.
        bnb = config.quant in ("bnb-int8", "nf4")
        if self.device.type == "cuda" and self.model.ops.name == "triton" and not bnb and not config.enforce_eager:
            self.runner.decode_graphs = build_decode_graphs(self.model, kv_caches, config.max_batch_size,
                                                            self.max_model_len, config.block_size,
                                                            self.runner.pad_block)
        self.metrics = EngineMetrics(self.model_name, self._metrics_state)
        self.metrics.set_weight_bytes(self.model.weight_bytes, self.model.linear_weight_bytes)
        self._rng = random.Random(config.seed)
        self._requests: dict[str, _Request] = {}
        self._starting: set[str] = set()   # ids of requests between arrival and registration (tokenizing, ...)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmserve-step")
        self._wake: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self.num_steps = 0
        self.draining = False
        self.failure: BaseException | None = None    # why the step loop died, once it has
        self.on_loop_death = None                    # called with that exception (the server exits non-zero)

    # --- the frontend's interface --------------------------------------------------------------
    async def generate(self, prompt: str | list[int], params: SamplingParams | None = None,
                       request_id: str | None = None, adapter: str | None = None,
                       parse_special_tokens: bool = False) -> AsyncIterator[RequestOutput]:
        """Yields deltas until one with finished=True. Leaving the iteration early aborts the request.
        adapter: the name of a loaded LoRA adapter to run with; None runs the base model.
        parse_special_tokens: let control-token strings in a text prompt become control tokens."""
        self._ensure_started()
        request_id = request_id or uuid.uuid4().hex
        if request_id in self._requests or request_id in self._starting:
            raise InvalidRequestError(f"request_id {request_id!r} is already in use", "request_id")
        self._starting.add(request_id)   # held across the awaits below, so a second request cannot take the id
        try:
            lora = self.resolve_adapter(adapter)
            if isinstance(prompt, str):
                if not prompt:
                    raise InvalidRequestError("prompt must not be empty", "prompt")
                prompt = await self.tokenize(prompt, parse_special_tokens=parse_special_tokens)
            seq = self._make_sequence(prompt, params or SamplingParams(), request_id)
            if self.draining or self.failure is not None:
                raise ShuttingDownError("the server is shutting down and takes no new requests"
                                        + (f" (the engine stopped: {self.failure})" if self.failure else ""))
            self.check_capacity()
            seq.lora = lora
            req = _Request(seq, asyncio.Queue(), IncrementalDetokenizer(self.tokenizer, seq.prompt_token_ids,
                                                                        seq.params.skip_special_tokens),
                           StopStringMatcher(seq.params.stop, seq.params.include_stop_str_in_output))
            if lora is not None:
                await self.lora_pool.acquire(lora)   # waits while every slot serves other adapters' requests
                if self.adapters.get(lora.name) is not lora:   # unloaded while this request waited for a slot
                    await self.lora_pool.release(lora)
                    if lora not in self.lora_pool.in_use:
                        self.lora_pool.evict(lora)
                    raise ModelNotFoundError(f"the adapter {lora.name!r} was unloaded")
            self._requests[request_id] = req
        finally:
            self._starting.discard(request_id)
        self.batcher.add(seq)
        self._wake.set()
        try:
            while True:
                out = await req.queue.get()
                if isinstance(out, BaseException):
                    raise out
                yield out
                if out.finished:
                    return
        finally:
            if request_id in self._requests and self._requests[request_id] is req:
                self.abort(request_id)
            if lora is not None:
                await self.lora_pool.release(lora)

    def check_capacity(self, count: int = 1):
        """ServerBusyError, counted once, when count more requests would pass --max-queued-requests (a frontend
        checks a many-prompt request once this way before starting its engine requests)."""
        limit = self.config.max_queued_requests
        if limit is not None and self.num_queued + count > limit and not self.draining:
            self.metrics.rejected.labels("queue_full").inc()
            needs = f"; this request needs {count} places" if count > 1 else ""
            raise ServerBusyError(f"the server is at capacity: {self.num_queued} requests are waiting to start "
                                  f"(--max-queued-requests {limit}){needs}; retry later")

    # --- adapters -------------------------------------------------------------------------------
    def resolve_adapter(self, name: str | None) -> LoRAAdapter | None:
        """None or the base model's name: the base model. Anything else must be a loaded adapter."""
        if name is None or name == "" or name == self.model_name:
            return None
        adapter = self.adapters.get(name)
        if adapter is None:
            known = ", ".join([self.model_name, *self.adapters])
            raise ModelNotFoundError(f"the model {name!r} does not exist; this server serves {known}")
        return adapter

    async def load_adapter(self, name: str, path: str) -> LoRAAdapter:
        """Loads a PEFT adapter from inside --lora-dir while serving continues; LoRAError says what is wrong."""
        if not name or name == self.model_name or name in self.adapters:
            raise LoRAError(f"the name {name!r} is taken or empty; adapters need a name of their own")
        if self.config.lora_dir is None:
            raise LoRAError("loading adapters at runtime needs --lora-dir (the directory adapters are loaded from)")
        root = Path(self.config.lora_dir).resolve()
        try:
            resolved = (root / path).resolve()
        except (OSError, ValueError) as e:   # a NUL byte, a path too long for the system
            raise LoRAError(f"the adapter path {path[:80]!r} cannot be used: {e}") from None
        if not resolved.is_relative_to(root):
            raise LoRAError(f"the adapter path {path[:80]!r} is outside --lora-dir")
        adapter = await asyncio.to_thread(load_adapter, name, resolved, self.model.config, self._take_adapter_id(),
                                          self.config.max_lora_rank, root)
        if name in self.adapters:  # loaded twice at once: the first one wins
            raise LoRAError(f"the name {name!r} is taken or empty; adapters need a name of their own")
        self._register(adapter)
        return adapter

    async def unload_adapter(self, name: str):
        """New requests for it are refused at once; returns when its in-flight requests have finished."""
        adapter = self.adapters.pop(name, None)
        if adapter is None:
            raise ModelNotFoundError(f"no adapter named {name!r} is loaded")
        await self.lora_pool.wait_idle(adapter)
        self.lora_pool.evict(adapter)
        log.info("unloaded LoRA adapter %r", name)

    def _register(self, adapter: LoRAAdapter):
        self.adapters[adapter.name] = adapter
        log.info("loaded LoRA adapter %r (rank %d, %d projections) from %s", adapter.name, adapter.rank,
                 len(adapter.weights), adapter.path)

    def _take_adapter_id(self) -> int:
        self._next_adapter_id += 1
        return self._next_adapter_id - 1

    def abort(self, request_id: str):
        """Ends the request now and frees its KV blocks; its stream gets a final 'abort' delta."""
        self._end_early(request_id, None)

    def _end_early(self, request_id: str, error: RequestFailedError | None):
        """Finish a request as aborted and free its blocks; its stream gets error, or a final 'abort' delta."""
        req = self._requests.pop(request_id, None)
        if req is None:
            return
        seq = req.seq
        if self.batcher.remove(seq):
            seq.status, seq.finish_reason = SequenceStatus.FINISHED, FinishReason.ABORT
        else:
            self.scheduler.finish(seq, FinishReason.ABORT)
        self.metrics.on_finished(seq, time.monotonic())
        req.queue.put_nowait(error or self._output(req, [], [] if seq.params.logprobs is not None else None, ""))

    def _clear_blocks(self, seq: Sequence):
        blocks = self.block_manager.forget_exclusive_blocks(seq)
        if blocks:
            index = torch.tensor(blocks, device=self.device)
            for cache in self.runner.kv_caches:
                cache.index_fill_(1, index, 0)

    @property
    def num_in_flight(self) -> int:
        return len(self._requests)

    @property
    def num_queued(self) -> int:
        """Requests accepted but not yet started: in the batcher or waiting in the scheduler."""
        return len(self.batcher) + len(self.scheduler.waiting)

    def _expire(self, now: float):
        limit = self.config.request_timeout
        for request_id, req in list(self._requests.items()):
            if now - req.seq.arrival_time > limit:
                self.metrics.rejected.labels("timeout").inc()
                self._end_early(request_id, RequestTimeoutError(
                    f"request {request_id} timed out after {limit:g} s (--request-timeout) with "
                    f"{req.seq.num_output_tokens} tokens generated"))

    def _metrics_state(self) -> tuple[int, int, float, float, int, int]:
        bm = self.block_manager
        hit_ratio = bm.prefix_hits / bm.prefix_queries if bm.prefix_queries else 0.0
        return (len(self.scheduler.running), len(self.scheduler.waiting) + len(self.batcher), bm.usage, hit_ratio,
                len(self.adapters), len(self.lora_pool.resident))

    def health(self) -> bool:
        return not self.draining and (self._loop_task is None or not self._loop_task.done())

    def start_draining(self):
        """Refuse new requests from now on (health turns false); the ones in flight go on."""
        self.draining = True

    async def wait_until_idle(self, timeout: float) -> bool:
        """True once no request is in flight; False if some still are after timeout seconds."""
        deadline = time.monotonic() + timeout
        while self._requests and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return not self._requests

    def abort_all(self, why: str):
        """Ends every request in flight now with a ShutdownAbortError that says why; their blocks are freed."""
        for request_id in list(self._requests):
            self._end_early(request_id, ShutdownAbortError(f"request {request_id} was aborted: {why}"))

    async def shutdown(self):
        for request_id in list(self._requests):
            self.abort(request_id)
        if self._loop_task is not None and not self._loop_task.done():
            self._loop_task.cancel()
            try:
                await self._loop_task
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=True)

    # --- request intake ------------------------------------------------------------------------
    async def tokenize(self, text: str, add_special_tokens: bool = True, parse_special_tokens: bool = False,
                       param: str = "prompt") -> list[int]:
        """A text's token ids. A text too long to fit the context whatever its tokens is refused before any
        tokenizing, and a long one is tokenized on a worker thread, so one big prompt never stalls the others.
        Control-token strings in it stay text unless parse_special_tokens."""
        return await self._encode_bounded(len(text), param, functools.partial(
            self.tokenizer.encode, text, add_special_tokens=add_special_tokens,
            split_special_tokens=not parse_special_tokens))

    async def tokenize_chat(self, messages: list[dict]) -> list[int]:
        """A chat prompt's token ids (server/tokenizer.py encode_chat), bounded and off the loop as tokenize()."""
        # each message costs the template some characters of its own, whatever its content
        chars = sum(_MESSAGE_CHARS + sum(len(m[k]) for k in ("content", "name") if isinstance(m.get(k), str))
                    for m in messages)
        return await self._encode_bounded(chars, "messages", functools.partial(encode_chat, self.tokenizer, messages))

    async def _encode_bounded(self, chars: int, param: str, encode) -> list[int]:
        """encode() for a prompt of chars characters: refused when too long to fit, off the loop when long."""
        if chars > self.max_prompt_chars:
            raise InvalidRequestError(
                f"the prompt has {chars} characters; no text over {self.max_prompt_chars} can fit this model's "
                f"maximum context length of {self.max_model_len} tokens", param)
        return encode() if chars < _INLINE_TOKENIZE_CHARS else await asyncio.to_thread(encode)

    def _make_sequence(self, token_ids: list[int], params: SamplingParams, request_id: str) -> Sequence:
        token_ids = list(token_ids)
        if not token_ids:
            raise InvalidRequestError("prompt must not be empty", "prompt")
        bad = [t for t in token_ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidRequestError(
                f"prompt token ids must be integers in [0, {self.vocab_size}); got {bad[0]!r}", "prompt")
        n = len(token_ids)
        if n >= self.max_model_len:
            raise InvalidRequestError(
                f"this model's maximum context length is {self.max_model_len} tokens, but the prompt has {n} tokens; "
                f"at most {self.max_model_len - 1} prompt tokens fit", "prompt")
        room = min(self.max_model_len, self.kv_cache_tokens) - n
        if room < 1:
            raise InvalidRequestError(
                f"the prompt has {n} tokens but the KV cache holds {self.kv_cache_tokens}", "prompt")
        max_tokens = params.max_tokens if params.max_tokens is not None else room
        if max_tokens > room:
            raise InvalidRequestError(
                f"max_tokens must be between 1 and {room} for this prompt ({n} tokens, context length "
                f"{self.max_model_len}); got {max_tokens}", "max_tokens")
        seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        return Sequence(request_id, token_ids, params, generator, max_tokens)

    # --- the step loop -------------------------------------------------------------------------
    def _ensure_started(self):
        if self._loop_task is not None and self._loop_task.get_loop() is not asyncio.get_running_loop():
            raise RuntimeError("an AsyncEngine serves the one event loop it started on; this is another")
        if self._loop_task is None:
            self._wake = asyncio.Event()
            self._loop_task = asyncio.get_running_loop().create_task(self._step_loop(), name="lmserve-step-loop")

    async def _step_loop(self):
        try:
            await self._run_steps()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # the loop itself died: nobody may wait on it forever
            log.exception("engine step loop died")
            self.failure = exc
            if self.on_loop_death is not None:
                self.on_loop_death(exc)
            for request_id, req in list(self._requests.items()):
                del self._requests[request_id]
                req.queue.put_nowait(RequestFailedError(f"request {request_id} failed: the engine stopped: {exc}"))
            raise

    async def _run_steps(self):
        loop = asyncio.get_running_loop()
        # The last step's tokens are detokenized and delivered while the next step runs. A stop string found
        # then ends its sequence one step late: the token computed for it in that step is dropped, as for an
        # abort that arrives mid-step.
        undelivered: list[tuple[Sequence, SampledToken]] = []
        while True:
            self._wake.clear()
            if self.config.request_timeout is not None:
                self._expire(time.monotonic())
            for seq in self.batcher.release():
                self.scheduler.add(seq)
            if not self.scheduler.has_work():
                self._deliver(undelivered)
                try:
                    await asyncio.wait_for(self._wake.wait(), self.batcher.seconds_until_ready())
                except TimeoutError:
                    pass
                continue
            out = self.scheduler.schedule()
            if not out.scheduled:
                self._deliver(undelivered)
                await asyncio.sleep(0.001)
                continue
            now = time.monotonic()
            for item in out.scheduled:
                if item.seq.first_scheduled_time is None:
                    item.seq.first_scheduled_time = now
                    self.metrics.on_scheduled(item.seq, now)
            self.metrics.on_step(len(out.scheduled), out.num_preempted)
            batch = self.runner.prepare(out)
            step = loop.run_in_executor(self._executor, self.runner.run, batch)
            self._deliver(undelivered)
            try:
                result = await step
            except Exception as exc:  # one bad step fails the requests in it, not the server
                log.exception("engine step failed")
                self._fail(out, exc)
                continue
            self.num_steps += 1
            for seq, reason in result.failed.items():
                self._clear_blocks(seq)   # NaN / inf in its cache blocks would spread to their next owner
                self._end_early(seq.request_id, RequestFailedError(f"request {seq.request_id} failed: {reason}"))
            for seq, scored in result.prompt_logprobs.items():
                seq.prompt_logprobs.extend(scored)
            undelivered = [(seq, result.sampled[seq])
                           for seq in self.scheduler.update(out, result.sampled, self.eos_token_ids)]

    def _deliver(self, sampled: list[tuple[Sequence, SampledToken]]):
        for seq, token in sampled:
            self._emit(seq, token)
        sampled.clear()

    def _emit(self, seq: Sequence, token: SampledToken):
        req = self._requests.get(seq.request_id)
        if req is None or req.seq is not seq:
            return
        now = time.monotonic()
        self.metrics.on_token(seq, now, seq.last_token_time)
        seq.last_token_time = now
        try:
            req.detokenizer.step([token.token_id], final=seq.is_finished)
        except Exception as e:  # this request's text cannot be made: it fails, the others go on
            log.exception("detokenizing request %s failed", seq.request_id)
            self._end_early(seq.request_id, RequestFailedError(
                f"request {seq.request_id} failed: detokenizing token {token.token_id}: {type(e).__name__}: {e}"))
            return
        text = req.stop_matcher.feed(req.detokenizer.text, final=seq.is_finished)
        if req.stop_matcher.matched is not None and not seq.is_finished:
            self.scheduler.finish(seq, FinishReason.STOP)
            text += req.stop_matcher.feed(req.detokenizer.text, final=True)
        logprobs = [token] if seq.params.logprobs is not None else None
        out = self._output(req, [token.token_id], logprobs, text)
        if seq.num_output_tokens == 1:
            out.prompt_token_ids = seq.prompt_token_ids
            if seq.params.prompt_logprobs is not None:
                out.prompt_logprobs = [None] + seq.prompt_logprobs
        req.queue.put_nowait(out)
        if seq.is_finished:
            del self._requests[seq.request_id]
            self.metrics.on_finished(seq, now)
            if self.config.log_requests:
                request_log.info("request %s finished (%s): prompt %r output %r", seq.request_id,
                                 seq.finish_reason.value, mask_pii(self.tokenizer.decode(seq.prompt_token_ids)),
                                 mask_pii(req.detokenizer.text))

    def _output(self, req: _Request, token_ids, logprobs, text) -> RequestOutput:
        seq = req.seq
        stop_reason = None
        if seq.finish_reason is FinishReason.STOP:
            last = seq.token_ids[-1]
            stop_reason = req.stop_matcher.matched or (last if last in seq.params.stop_token_ids else None)
        return RequestOutput(
            request_id=seq.request_id, token_ids=token_ids, text=text, logprobs=logprobs,
            finished=seq.is_finished, finish_reason=seq.finish_reason.value if seq.finish_reason else None,
            num_prompt_tokens=seq.num_prompt_tokens, num_cached_tokens=seq.num_cached_tokens or 0,
            num_output_tokens=seq.num_output_tokens, stop_reason=stop_reason)

    def _fail(self, out: SchedulerOutput, exc: Exception):
        for item in out.scheduled:
            req = self._requests.pop(item.seq.request_id, None)
            self.scheduler.finish(item.seq, FinishReason.ABORT)
            if req is not None:
                self.metrics.on_finished(item.seq, time.monotonic())
                req.queue.put_nowait(RequestFailedError(f"request {item.seq.request_id} failed in the engine: {exc}"))


def _longest_token_chars(tokenizer) -> int:
    """The most characters one token can stand for (its vocabulary string has at least as many)."""
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return max(len(t) for t in tokens if isinstance(t, str))


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _resolve_dtype(dtype: str, device: torch.device, hf_config) -> torch.dtype:
    if dtype != "auto":
        return getattr(torch, dtype)
    if device.type == "cpu":
        return torch.float32
    checkpoint_dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(checkpoint_dtype, str):
        checkpoint_dtype = getattr(torch, checkpoint_dtype, None)
    return checkpoint_dtype if checkpoint_dtype in (torch.float16, torch.bfloat16) else torch.float16


def _adapters_in(lora_dir: str | None) -> list[tuple[str, str]]:
    """Every adapter directly inside --lora-dir, named by its directory."""
    if lora_dir is None:
        return []
    root = Path(lora_dir)
    if not root.is_dir():
        raise LoRAError(f"--lora-dir {lora_dir} is not a directory")
    # one that leads outside the directory (a symlink) is refused by load_adapter's root check, file by file
    return [(d.name, str(d)) for d in sorted(root.iterdir()) if (d / "adapter_config.json").is_file()]
