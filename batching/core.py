"""EngineCore: the model, its KV cache, the batcher, the scheduler and the step loop; token ids in, token ids out.

It knows nothing of text: an API process (server/engine_client.py) tokenizes, detokenizes and checks stop
strings. Requests come in through add_request / abort; each step's news goes out through sink(outputs) as one
list of CoreOutput, delivered while the next step runs. The core runs on an asyncio loop of its own: in its own
process behind the engine socket (batching/core_process.py), or on the API's loop for tests and debugging.
The model runs on a worker thread, so the loop takes requests in while a step computes.
"""
import asyncio
import logging
import random
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch

from batching.adapters import AdapterRegistry
from batching.batcher import DynamicBatcher
from batching.engine_model import build_engine_model
from batching.limits import check_prompt
from batching.messages import AdapterInfo, AddRequest, CoreOutput, EngineInfo, ErrorInfo
from batching.scheduler import Scheduler, SchedulerOutput
from server.config import EngineConfig
from server.errors import (EngineDeadError, ModelNotFoundError, RequestFailedError, RequestTimeoutError,
                           ServerBusyError, ShutdownAbortError, ShuttingDownError, error_to_wire)
from server.host_memory import keep_freed_memory
from batching.kv_cache import BlockManager
from server.cpu_threads import release_idle_team
from server.loader import load_hf_config
from server.lora import LoRAAdapter
from server.metrics import EngineMetrics, EngineState
from server.model_source import resolve_model
from server.sampling import InvalidRequestError, SampledToken, SamplingParams
from server.structured_output import GrammarCompiler
from server.tp_workers import WorkerStartError
from batching.sequence import FinishReason, Sequence, SequenceStatus
from server.tokenizer import eos_token_ids, load_tokenizer

log = logging.getLogger(__name__)


class EngineCore:
    CALLS = ("info", "load_adapter", "unload_adapter", "adapters", "metrics", "check_capacity")   # over the socket

    def __init__(self, config: EngineConfig, sink: Callable[[list[CoreOutput]], None] | None = None):
        self.config = config
        source = resolve_model(config.model)
        self.model_path = source.path
        self.model_name = config.served_model_name or source.name
        hf_config = load_hf_config(self.model_path)
        self.device = resolve_device(config.device)
        if self.device.type == "cpu":
            keep_freed_memory()
        self.dtype = _resolve_dtype(config.dtype, self.device, hf_config)
        self.tokenizer = load_tokenizer(self.model_path)
        self.eos_token_ids = eos_token_ids(self.model_path, hf_config, self.tokenizer)
        self.max_model_len = config.max_model_len or hf_config.max_position_embeddings
        if self.max_model_len > hf_config.max_position_embeddings:
            raise ValueError(f"max_model_len must be at most the model's max_position_embeddings "
                             f"({hf_config.max_position_embeddings}); got {self.max_model_len}")
        self.failure: BaseException | None = None    # why the engine stopped (its step loop or a worker died)
        self.on_loop_death = None                    # called with that exception (the server exits non-zero)
        self._loop_task: asyncio.Task | None = None
        self._started = False
        try:
            self._home_loop = asyncio.get_running_loop()   # where a dead worker is reported before the first request
        except RuntimeError:
            self._home_loop = None
        # All of the model's work runs on the step thread, loading included (server/cpu_threads.py).
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmserve-step")
        try:
            self._executor.submit(self._load_model, config).result()
        except BaseException:
            self._executor.shutdown(wait=False)
            raise
        release_idle_team()
        self.grammars = GrammarCompiler(self.tokenizer, self.vocab_size, self.eos_token_ids)
        self.metrics = EngineMetrics(self.model_name, self._metrics_state)
        self.metrics.set_weight_bytes(self.model.weight_bytes, self.model.linear_weight_bytes)
        self.metrics.adapter_load_failures.inc(self.adapter_registry.skipped_at_start)
        self.sink = sink or (lambda outputs: None)
        self._rng = random.Random(config.seed)
        self._seqs: dict[str, Sequence] = {}     # every request from add_request to its end
        self._pinned: set[Sequence] = set()      # requests holding their adapter's device slot
        self._awaiting_grammar = 0               # requests whose grammar is being compiled
        self._wake: asyncio.Event | None = None
        self.num_steps = 0
        self.draining = False
        self._started = True
        if self.failure is not None:   # a tensor-parallel worker died while the engine started
            self.tp_workers.kill()
            self._executor.shutdown(wait=False)
            raise WorkerStartError(f"the engine could not start: {self.failure}")

    def _load_model(self, config: EngineConfig):
        """The model, its KV cache, the model runner and the adapters named at start (on the step thread)."""
        built = build_engine_model(config, self.model_path, self.device, self.dtype, self.max_model_len,
                                   self.eos_token_ids, self._on_worker_death)
        self.model, self.runner, self.lora_pool, self.tp_workers = built.model, built.runner, built.lora_pool, built.tp_workers
        try:
            self.vocab_size = self.model.config.vocab_size
            self.kv_cache_tokens = built.num_blocks * config.block_size
            self.block_manager = BlockManager(built.num_blocks, config.block_size, config.enable_prefix_caching)
            self.scheduler = Scheduler(self.block_manager, config.max_batch_size, config.max_num_batched_tokens)
            self.batcher = DynamicBatcher(config.max_batch_size, config.max_wait_ms)
            self.adapter_registry = AdapterRegistry(config, self.model.config, self.model_name)
            self.adapters = self.adapter_registry.by_name   # name -> LoRAAdapter, as requests name them
        except BaseException:   # a bad --lora: the workers go too
            if self.tp_workers is not None:
                self.tp_workers.kill()
            raise

    async def call(self, method: str, *args):
        """One of CALLS by name, as the engine socket and the in-process client ask for them."""
        if method not in self.CALLS:
            raise ValueError(f"no engine call {method!r}")
        if method == "adapters":
            return self.adapter_infos()
        if method == "metrics":
            return self.metrics.render()
        result = getattr(self, method)(*args)
        return await result if asyncio.iscoroutine(result) else result

    def info(self) -> EngineInfo:
        return EngineInfo(self.model_name, str(self.model_path), self.max_model_len, self.vocab_size,
                          self.kv_cache_tokens, list(self.eos_token_ids))

    # --- requests in ----------------------------------------------------------------------------
    def add_request(self, req: AddRequest):
        """Admits a request, or raises what is wrong with it (InvalidRequestError, ModelNotFoundError,
        ServerBusyError, ShuttingDownError); a later refusal (its adapter unloaded meanwhile) comes as its output."""
        self._ensure_started()
        if req.request_id in self._seqs:
            raise InvalidRequestError(f"request_id {req.request_id!r} is already in use", "request_id")
        if self.failure is not None:
            raise EngineDeadError(f"the engine stopped: {self.failure}")
        if self.draining:
            raise ShuttingDownError("the server is shutting down and takes no new requests")
        lora = self.resolve_adapter(req.adapter)
        seq = self._make_sequence(req.prompt_token_ids, req.params, req.request_id, req.arrival_time)
        self.check_capacity()
        seq.lora = lora
        self._seqs[seq.request_id] = seq
        if req.params.structured_output is not None:
            asyncio.get_running_loop().create_task(self._admit_with_grammar(seq, lora))
        elif lora is None:
            self._admit(seq)
        else:
            asyncio.get_running_loop().create_task(self._admit_with_adapter(seq, lora))

    def _admit(self, seq: Sequence):
        self.batcher.add(seq)
        self._wake.set()

    async def _admit_with_grammar(self, seq: Sequence, lora: LoRAAdapter | None):
        """The request waits for its grammar (compiled on a worker thread, or cached) while others run."""
        self._awaiting_grammar += 1
        try:
            grammar = await self.grammars.matcher(seq.params.structured_output)
        except asyncio.CancelledError:
            raise
        except BaseException as e:   # llguidance's panics are BaseExceptions: the request must still end
            if self._seqs.get(seq.request_id) is seq:
                self._end_early(seq.request_id, e if isinstance(e, InvalidRequestError) else RequestFailedError(
                    f"request {seq.request_id} failed: its grammar could not be compiled: {e}"))
            return
        finally:
            self._awaiting_grammar -= 1
        if self._seqs.get(seq.request_id) is not seq:   # aborted while it waited
            return
        seq.grammar = grammar
        seq.grammar_armed = seq.params.structured_output.start_after is None
        if lora is None:
            self._admit(seq)
        else:
            await self._admit_with_adapter(seq, lora)

    async def _admit_with_adapter(self, seq: Sequence, lora: LoRAAdapter):
        await self.lora_pool.acquire(lora)   # waits while every slot serves other adapters' requests
        self._pinned.add(seq)
        if self._seqs.get(seq.request_id) is not seq:   # aborted while it waited
            self._pinned.discard(seq)
            await self.lora_pool.release(lora)
            if self.adapters.get(lora.name) is not lora and lora not in self.lora_pool.in_use:
                self.lora_pool.evict(lora)
        elif self.adapters.get(lora.name) is not lora:   # unloaded while it waited
            self._end_early(seq.request_id, ModelNotFoundError(f"the adapter {lora.name!r} was unloaded"))
        else:
            self._admit(seq)

    def abort(self, request_id: str, reason: FinishReason = FinishReason.ABORT):
        """Ends the request now (an API process's abort, or its stop string: reason STOP) and frees its blocks;
        nothing more is sent for it."""
        seq = self._seqs.get(request_id)
        if seq is None:
            return
        if self.batcher.remove(seq):
            seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason
        else:
            self.scheduler.finish(seq, reason)
        self.metrics.on_finished(seq, time.monotonic())
        self._forget(seq)

    def _end_early(self, request_id: str, error: Exception):
        """Ends a request as aborted for a reason of the engine's own; its output carries the error."""
        self.abort(request_id)
        self.sink([CoreOutput(request_id, [], error=ErrorInfo(*error_to_wire(error)))])

    def _forget(self, seq: Sequence):
        del self._seqs[seq.request_id]
        if seq in self._pinned:
            self._pinned.discard(seq)
            asyncio.get_running_loop().create_task(self._release(seq.lora))

    async def _release(self, lora: LoRAAdapter):
        await self.lora_pool.release(lora)
        if self.adapters.get(lora.name) is not lora and lora not in self.lora_pool.in_use:
            self.lora_pool.evict(lora)   # unloaded while this request ran: its slot is free now

    def check_capacity(self, count: int = 1):
        """ServerBusyError, counted once, when count more requests would pass --max-queued-requests."""
        limit = self.config.max_queued_requests
        if limit is not None and self.num_queued + count > limit and not self.draining:
            self.metrics.rejected.labels("queue_full").inc()
            needs = f"; this request needs {count} places" if count > 1 else ""
            raise ServerBusyError(f"the server is at capacity: {self.num_queued} requests are waiting to start "
                                  f"(--max-queued-requests {limit}){needs}; retry later")

    @property
    def num_queued(self) -> int:
        """Requests accepted but not yet started: waiting for their grammar, in the batcher or in the scheduler."""
        return self._awaiting_grammar + len(self.batcher) + len(self.scheduler.waiting)

    def _make_sequence(self, token_ids: list[int], params: SamplingParams, request_id: str,
                       arrival_time: float) -> Sequence:
        token_ids = list(token_ids)
        max_tokens = check_prompt(token_ids, params, self.vocab_size, self.max_model_len, self.kv_cache_tokens)
        seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        now = time.monotonic()
        arrival = arrival_time if 0 < arrival_time <= now else now
        return Sequence(request_id, token_ids, params, generator, max_tokens, arrival_time=arrival)

    # --- adapters (batching/adapters.py) ------------------------------------------------------------
    def resolve_adapter(self, name: str | None) -> LoRAAdapter | None:
        return self.adapter_registry.resolve(name)

    def adapter_infos(self) -> list[AdapterInfo]:
        return self.adapter_registry.infos()

    async def load_adapter(self, name: str, path: str) -> AdapterInfo:
        """Loads a PEFT adapter from inside --lora-dir while serving continues; LoRAError says what is wrong."""
        try:
            return await self.adapter_registry.load(name, path)
        except Exception:
            self.metrics.adapter_load_failures.inc()
            raise

    async def unload_adapter(self, name: str):
        """New requests for it are refused at once; returns when its in-flight requests have finished."""
        adapter = self.adapter_registry.remove(name)
        await self.lora_pool.wait_idle(adapter)
        self.lora_pool.evict(adapter)
        log.info("unloaded LoRA adapter %r", name)

    # --- state ----------------------------------------------------------------------------------
    def _metrics_state(self) -> EngineState:
        bm = self.block_manager
        waiting = [s for s in self._seqs.values() if s.status is SequenceStatus.WAITING]
        return EngineState(len(self.scheduler.running), len(waiting), bm.usage,
                           bm.prefix_hits / bm.prefix_queries if bm.prefix_queries else 0.0,
                           len(self.adapters), len(self.lora_pool.resident),
                           sorted({s.lora.name for s in self.scheduler.running if s.lora is not None}),
                           sorted({s.lora.name for s in waiting if s.lora is not None}), self.config.max_loras)

    @property
    def num_in_flight(self) -> int:
        return len(self._seqs)

    def health(self) -> bool:
        return self.failure is None and (self._loop_task is None or not self._loop_task.done())

    def start_draining(self):
        """Refuse new requests from now on; the ones in flight go on."""
        self.draining = True

    def abort_all(self, why: str):
        """Ends every request in flight now with a ShutdownAbortError that says why; their blocks are freed."""
        for request_id in list(self._seqs):
            self._end_early(request_id, ShutdownAbortError(f"request {request_id} was aborted: {why}"))

    async def shutdown(self):
        for request_id in list(self._seqs):
            self.abort(request_id)
        if self._loop_task is not None and not self._loop_task.done():
            self._loop_task.cancel()
            try:
                await self._loop_task
            except BaseException:   # cancelled, or the exception it died of (logged then)
                pass
        if self.tp_workers is not None and self.failure is not None:
            self.tp_workers.kill()   # a step may be stuck in a collective with a dead rank: do not wait for it
            self._executor.shutdown(wait=False)
        else:
            if self.tp_workers is not None:   # on the step thread, after any step still running: the workers die
                await asyncio.get_running_loop().run_in_executor(self._executor, self.tp_workers.stop)   # with it
            self._executor.shutdown(wait=True)
        self.runner.shutdown()
        self.grammars.shutdown()

    # --- the step loop -------------------------------------------------------------------------
    def _ensure_started(self):
        if self._loop_task is not None and self._loop_task.get_loop() is not asyncio.get_running_loop():
            raise RuntimeError("an EngineCore serves the one event loop it started on; this is another")
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
            self._die(exc)
            raise

    def _die(self, exc: BaseException):
        """The engine cannot go on (its step loop died, or a tensor-parallel worker): every request ends with
        an error, health turns false, and on_loop_death stops the server."""
        if self.failure is not None:
            return
        self.failure = exc
        error = ErrorInfo(*error_to_wire(EngineDeadError(f"the engine stopped: {exc}")))
        outputs = [CoreOutput(request_id, [], error=error) for request_id in self._seqs]
        self._seqs.clear()
        self.sink(outputs)
        if self._loop_task is not None and self._loop_task is not asyncio.current_task():
            self._loop_task.cancel()
        if self.on_loop_death is not None:
            self.on_loop_death(exc)

    def _on_worker_death(self, exc: BaseException):
        """From a worker's watch thread: the engine dies on its event loop (health turns false at once)."""
        loop = self._loop_task.get_loop() if self._loop_task is not None else self._home_loop
        if not self._started or loop is None or loop.is_closed():
            self.failure = self.failure or exc
        else:
            loop.call_soon_threadsafe(self._die, exc)

    async def _run_steps(self):
        loop = asyncio.get_running_loop()
        # One step's outputs are handed to the sink while the next step runs. A stop string the API finds then
        # ends its sequence one step late: the token computed for it in that step is dropped, as for an abort
        # that arrives mid-step.
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
                if self.tp_workers is not None:
                    raise   # the ranks' collectives are out of step (or a rank is gone): the engine cannot go on
                log.exception("engine step failed")
                self._fail(out, exc)
                continue
            self.num_steps += 1
            for seq, error in result.failed.items():
                self._clear_blocks(seq)   # NaN / inf in its cache blocks would spread to their next owner
                if self._seqs.get(seq.request_id) is seq:
                    self._end_early(seq.request_id, error)
            for seq, scored in result.prompt_logprobs.items():
                seq.prompt_logprobs.extend(scored)
            undelivered = [(seq, result.sampled[seq])
                           for seq in self.scheduler.update(out, result.sampled, self.eos_token_ids)]

    def _deliver(self, sampled: list[tuple[Sequence, SampledToken]]):
        if not sampled:
            return
        now = time.monotonic()
        outputs = []
        for seq, token in sampled:
            if self._seqs.get(seq.request_id) is not seq:   # ended meanwhile (aborted, stop string, failed)
                continue
            self.metrics.on_token(seq, now, seq.last_token_time)
            seq.last_token_time = now
            out = CoreOutput(seq.request_id, [token.token_id],
                             [token] if seq.params.logprobs is not None else None,
                             seq.finish_reason.value if seq.is_finished else None)
            if seq.num_output_tokens == 1:
                out.num_cached_tokens = seq.num_cached_tokens or 0
                if seq.params.prompt_logprobs is not None:
                    out.prompt_logprobs = [None] + seq.prompt_logprobs
            outputs.append(out)
            if seq.is_finished:
                self.metrics.on_finished(seq, now)
                self._forget(seq)
        sampled.clear()
        self.sink(outputs)

    def _clear_blocks(self, seq: Sequence):
        blocks = self.block_manager.forget_exclusive_blocks(seq)
        if blocks:
            self.runner.clear_blocks(blocks)

    def _expire(self, now: float):
        limit = self.config.request_timeout
        for request_id, seq in list(self._seqs.items()):
            if now - seq.arrival_time > limit:
                self.metrics.rejected.labels("timeout").inc()
                self._end_early(request_id, RequestTimeoutError(
                    f"request {request_id} timed out after {limit:g} s (--request-timeout) with "
                    f"{seq.num_output_tokens} tokens generated"))

    def _fail(self, out: SchedulerOutput, exc: Exception):
        for item in out.scheduled:
            if self._seqs.get(item.seq.request_id) is item.seq:
                self._end_early(item.seq.request_id,
                                RequestFailedError(f"request {item.seq.request_id} failed in the engine: {exc}"))
            else:
                self.scheduler.finish(item.seq, FinishReason.ABORT)


def resolve_device(device: str) -> torch.device:
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
