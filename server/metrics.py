"""Prometheus metrics, named once, in a registry per engine; the engine calls the hooks, /metrics renders.

Latencies are histograms (queue time, time to first token, inter-token latency, end-to-end); requests
running / waiting, KV cache usage and prefix-cache hit ratio are gauges read at scrape time; tokens and
finished requests are counters. The event loop's task count and the Python thread count are gauges too, so a
leak (a task or thread left behind by a request) shows as a number that grows at idle. Request metrics carry
the model name as a label: the adapter's name for a request served with a LoRA adapter, so each adapter's
traffic and latency can be told apart. The engine core renders its registry on request; each API process
appends its own gauges (render_process_metrics).
"""
import asyncio
import threading
import time
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from batching.sequence import Sequence

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0,
                    40.0, 80.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass
class _ModelSeries:
    """One model name's labelled children of the request metrics."""
    name: str
    queue_time: Histogram
    ttft: Histogram
    itl: Histogram
    e2e: Histogram
    prompt_tokens: Counter
    generation_tokens: Counter


@dataclass
class EngineState:
    """What the gauges show, read from the engine at each scrape."""
    running: int                    # requests in the running batch
    waiting: int                    # requests accepted and not running: queued, preempted, awaiting a grammar or slot
    kv_cache_usage: float           # 0-1
    prefix_cache_hit_ratio: float
    adapters_loaded: int
    adapters_resident: int
    running_adapters: list[str]     # the LoRA adapters of running requests, and of waiting ones
    waiting_adapters: list[str]
    max_loras: int                  # adapters the device holds at once


class EngineMetrics:
    def __init__(self, model_name: str, state):
        """state() returns an EngineState, read at each scrape."""
        self.model_name = model_name
        self.state = state
        r = self.registry = CollectorRegistry()
        m = ["model_name"]
        self.queue_time = Histogram("lmserve_request_queue_time_seconds", "Arrival to first scheduling.", m,
                                    buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("lmserve_time_to_first_token_seconds", "Arrival to first output token.", m,
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("lmserve_inter_token_latency_seconds", "Time between consecutive output tokens.", m,
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("lmserve_e2e_request_latency_seconds", "Arrival to finish.", m,
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("lmserve_prompt_tokens", "Prompt tokens of requests that produced a token.", m,
                                     registry=r)
        self.generation_tokens = Counter("lmserve_generation_tokens", "Output tokens produced.", m, registry=r)
        self.finished = Counter("lmserve_requests_finished", "Finished requests by reason.", m + ["finished_reason"],
                                registry=r)
        self.batch_size = Histogram("lmserve_batch_size", "Sequences per engine step.", buckets=_BATCH_BUCKETS,
                                    registry=r)
        self.running = Gauge("lmserve_num_requests_running", "Requests in the running batch.", registry=r)
        self.waiting = Gauge("lmserve_num_requests_waiting", "Requests accepted and not running: queued, preempted, "
                             "awaiting their grammar or an adapter slot.", registry=r)
        self.kv_usage = Gauge("lmserve_kv_cache_usage_ratio", "Share of KV cache blocks in use.", registry=r)
        self.prefix_hit_ratio = Gauge("lmserve_prefix_cache_hit_ratio",
                                      "Prompt tokens served from the prefix cache over prompt tokens looked up.",
                                      registry=r)
        self.weight_bytes = Gauge("lmserve_model_weight_bytes",
                                  "Bytes the model weights take on the device; part=linear: the decoder layers' "
                                  "projections (what quantization shrinks), part=all: every weight.",
                                  m + ["part"], registry=r)
        # The Gateway API Inference Extension's LoRA-affinity metric, with vLLM's labels and meaning (its
        # endpoint picker reads the newest series, so the value is the time it was read).
        self.lora_requests = Gauge("lmserve_lora_requests_info", "LoRA adapters of running and waiting requests "
                                   "(comma-separated names) and the device's adapter slots; value: when it was read "
                                   "(Unix seconds).", ["running_lora_adapters", "waiting_lora_adapters", "max_lora"],
                                   registry=r)
        self.lora_adapters = Gauge("lmserve_lora_adapters",
                                   "LoRA adapters by state: loaded (servable by name), resident (in the device pool).",
                                   ["state"], registry=r)
        self.adapter_load_failures = Counter("lmserve_lora_adapter_load_failures",
                                             "LoRA adapters that failed to load: skipped from --lora-dir at start, "
                                             "or refused by /v1/load_lora_adapter.", registry=r)
        self.preemptions = Counter("lmserve_num_preemptions", "Sequences preempted for lack of KV blocks.",
                                   registry=r)
        self.rejected = Counter("lmserve_requests_rejected",
                                "Requests refused or ended by a limit: queue_full (--max-queued-requests, never "
                                "started) or timeout (--request-timeout, ended early; also counted as finished "
                                "with reason abort).", ["reason"], registry=r)
        for reason in ("queue_full", "timeout"):
            self.rejected.labels(reason)   # at 0 from the start: alert rules see a series, not an absent one
        self._by_model: dict[str, _ModelSeries] = {}

    def set_weight_bytes(self, total: int, linear: int):
        self.weight_bytes.labels(self.model_name, "all").set(total)
        self.weight_bytes.labels(self.model_name, "linear").set(linear)

    def on_scheduled(self, seq: Sequence, now: float):
        self._series(seq).queue_time.observe(now - seq.arrival_time)

    def on_token(self, seq: Sequence, now: float, previous_token_time: float | None):
        series = self._series(seq)
        if previous_token_time is None:
            series.ttft.observe(now - seq.arrival_time)
            series.prompt_tokens.inc(seq.num_prompt_tokens)
        else:
            series.itl.observe(now - previous_token_time)
        series.generation_tokens.inc()

    def on_finished(self, seq: Sequence, now: float):
        series = self._series(seq)
        series.e2e.observe(now - seq.arrival_time)
        self.finished.labels(series.name, seq.finish_reason.value).inc()

    def _series(self, seq: Sequence) -> "_ModelSeries":
        # labels() takes a lock and builds a key each call; per token that adds up, so each model's children are kept
        name = seq.lora.name if seq.lora is not None else self.model_name
        series = self._by_model.get(name)
        if series is None:
            series = self._by_model[name] = _ModelSeries(name, *(m.labels(name) for m in (
                self.queue_time, self.ttft, self.itl, self.e2e, self.prompt_tokens, self.generation_tokens)))
        return series

    def on_step(self, batch_size: int, num_preempted: int):
        self.batch_size.observe(batch_size)
        if num_preempted:
            self.preemptions.inc(num_preempted)

    def render(self) -> bytes:
        state = self.state()
        self.running.set(state.running)
        self.waiting.set(state.waiting)
        self.kv_usage.set(state.kv_cache_usage)
        self.prefix_hit_ratio.set(state.prefix_cache_hit_ratio)
        self.lora_adapters.labels("loaded").set(state.adapters_loaded)
        self.lora_adapters.labels("resident").set(state.adapters_resident)
        self.lora_requests.clear()
        self.lora_requests.labels(",".join(state.running_adapters), ",".join(state.waiting_adapters),
                                  str(state.max_loras)).set(time.time())
        return generate_latest(self.registry)


_process_registry = CollectorRegistry()
_loop_tasks = Gauge("lmserve_event_loop_tasks", "Tasks alive on this API process's event loop (the scrape's own "
                    "included).", registry=_process_registry)
_threads = Gauge("lmserve_threads", "Python threads alive in this API process.", registry=_process_registry)
http_responses = Counter("lmserve_http_responses", "HTTP responses this API process (pid) started, by route "
                         "(other: any path that is not a route) and status code.", ["pid", "route", "code"],
                         registry=_process_registry)
grpc_responses = Counter("lmserve_grpc_responses", "gRPC calls this API process (pid) ended, by method and status "
                         "code.", ["pid", "method", "code"], registry=_process_registry)


def render_process_metrics() -> bytes:
    """The scraped API process's own gauges, appended to the engine core's metrics."""
    try:
        _loop_tasks.set(len(asyncio.all_tasks()))
    except RuntimeError:  # rendered outside an event loop
        pass
    _threads.set(threading.active_count())
    return generate_latest(_process_registry)
