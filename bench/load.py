"""python -m bench.load: an open-loop load generator for lmserve (or any server with its HTTP or gRPC API).

Requests are sent at seeded Poisson arrival times at --qps whether or not earlier ones have finished
(a closed loop would hide queueing), with token-id prompts drawn from the server's own vocabulary and
ignore_eos, so every request generates exactly its max_tokens. It reports request rates, errors by type,
time to first token, inter-token and end-to-end latency percentiles, token throughput, and the server's
own /metrics counted over the run; --json writes all of it, --plot a PNG over time.

  python -m bench.load --qps 200 --duration 30 --stream --prompt-tokens 8:24 --max-tokens 16:32
"""
import argparse
import asyncio
import json
import sys
import urllib.request
from dataclasses import asdict, dataclass

from bench.clients import GrpcClient, HttpClient, RequestRecord, run_clock
from bench.report import format_report, plot, server_delta, summarize, without_nan
from bench.workload import Distribution, Workload


@dataclass
class LoadOptions:
    qps: float = 10.0
    duration: float | None = None          # seconds of arrivals (30 when neither this nor num_requests)
    num_requests: int | None = None
    url: str = "http://127.0.0.1:8000"
    grpc: str | None = None                # host:port; sends over gRPC instead of HTTP
    metrics_url: str | None = None         # default: URL/metrics over HTTP, none over gRPC
    model: str | None = None               # default: the server's base model
    stream: bool = False
    prompt_tokens: str = "32"
    max_tokens: str = "16:32"
    shared_prefix_tokens: int = 0
    adapters: list[str] | None = None      # spread requests over these served names, round robin
    max_in_flight: int | None = None       # hold arrivals while this many are in flight (client-side queueing)
    request_timeout: float = 300.0
    seed: int = 0
    progress: bool = True
    structured_fraction: float = 0.0       # this share of requests constrained by a JSON schema (bench/workload.py)
    prefix_groups: int = 1                 # distinct shared prefixes of shared_prefix_tokens (bench/workload.py)

    def workload(self, models: list[str]) -> Workload:
        duration = self.duration if self.duration is not None or self.num_requests is not None else 30.0
        return Workload(self.qps, Distribution.parse(self.prompt_tokens), Distribution.parse(self.max_tokens), models,
                        duration, self.num_requests, self.shared_prefix_tokens, self.seed, self.structured_fraction,
                        self.prefix_groups)


async def run_load(options: LoadOptions) -> tuple[dict, list[RequestRecord]]:
    """Run one load test; returns the report (as --json writes it) and each request's record."""
    clock = run_clock()
    client = (GrpcClient(options.grpc, options.stream, options.request_timeout, lambda: clock())
              if options.grpc else HttpClient(options.url, options.stream, options.request_timeout, lambda: clock()))
    metrics_url = options.metrics_url or (None if options.grpc else options.url.rstrip("/") + "/metrics")
    try:
        base, adapters = await client.models()
        models = options.adapters or [options.model or base]
        unknown = [m for m in models if m not in [base, *adapters]]
        if unknown:
            raise SystemExit(f"error: the server does not serve {', '.join(unknown)}; it serves {', '.join([base, *adapters])}")
        plan = options.workload(models).plan(await client.vocabulary())
        before = await _fetch(metrics_url)
        records = [RequestRecord(p.index, p.model, p.send_at, len(p.prompt_token_ids), p.max_tokens) for p in plan]
        slots = asyncio.Semaphore(options.max_in_flight) if options.max_in_flight else None
        clock = run_clock()   # restarted for the sends; the clients read it through their lambdas
        progress = asyncio.create_task(_progress(records, plan[-1].send_at if plan else 0.0, clock)) \
            if options.progress else None

        async def send(planned, record):
            try:
                await client.send(planned, record)
            finally:
                if slots:
                    slots.release()

        tasks = []
        for planned, record in zip(plan, records):
            delay = planned.send_at - clock()
            if delay > 0:
                await asyncio.sleep(delay)
            if slots:
                await slots.acquire()
            tasks.append(asyncio.create_task(send(planned, record)))
        await asyncio.gather(*tasks)
        if progress:
            progress.cancel()
            print(file=sys.stderr)
        after = await _fetch(metrics_url)
    finally:
        await client.close()
    report = {"options": asdict(options), "model": {"base": base, "sent": models},
              "client": summarize(records, options.qps),
              "server": server_delta(before, after) if before and after else None}
    return report, records


async def _fetch(url: str | None) -> str | None:
    if url is None:
        return None

    def get():
        try:
            with urllib.request.urlopen(url, timeout=30) as r:
                return r.read().decode()
        except OSError:
            return None
    return await asyncio.to_thread(get)


async def _progress(records: list[RequestRecord], last_send: float, clock):
    """One status line a second on stderr (rewritten in place on a terminal)."""
    tty = sys.stderr.isatty()
    while True:
        await asyncio.sleep(1.0 if tty else 5.0)
        now = clock()
        sent = sum(1 for r in records if r.start)
        done = [r for r in records if r.end]
        failed = sum(1 for r in done if not r.ok)
        tokens = sum(r.output_tokens for r in done)
        line = (f"t={now:6.1f}s/{last_send:.0f}s  sent {sent}  done {len(done)}  in flight {sent - len(done)}  "
                f"failed {failed}  output {tokens / max(now, 1e-9):.0f} tok/s")
        print(("\r" + line) if tty else line, end="" if tty else "\n", file=sys.stderr, flush=True)


def parse_args(argv=None) -> tuple[LoadOptions, argparse.Namespace]:
    d = LoadOptions()
    p = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--qps", type=float, required=True, help="offered request rate (Poisson arrivals)")
    bound = p.add_mutually_exclusive_group()
    bound.add_argument("--duration", type=float, help="seconds of arrivals (default 30)")
    bound.add_argument("--num-requests", type=int, help="send exactly this many requests")
    p.add_argument("--url", default=d.url, help="the server's HTTP address")
    p.add_argument("--grpc", default=None, metavar="HOST:PORT", help="send over gRPC to this address instead")
    p.add_argument("--metrics-url", default=None, help="Prometheus /metrics to read before and after "
                                                       "(default: URL/metrics over HTTP; none over gRPC)")
    p.add_argument("--model", default=None, help="the model name to send (default: the server's base model)")
    p.add_argument("--stream", action="store_true", help="stream responses (needed for client-side TTFT and ITL)")
    p.add_argument("--prompt-tokens", default=d.prompt_tokens, help="prompt length: N, LO:HI or normal:MEAN:STD")
    p.add_argument("--max-tokens", default=d.max_tokens, help="output length (ignore_eos): N, LO:HI or normal:MEAN:STD")
    p.add_argument("--shared-prefix-tokens", type=int, default=0, help="tokens every prompt starts with (one of "
                   "--prefix-groups prefixes)")
    p.add_argument("--prefix-groups", type=int, default=1, help="distinct shared prefixes; each request starts with "
                   "one drawn at random")
    p.add_argument("--adapters", default=None, help="comma-separated served names (LoRA adapters, or the base) "
                                                    "to spread requests over, round robin")
    p.add_argument("--max-in-flight", type=int, default=None, help="hold arrivals while this many are in flight")
    p.add_argument("--request-timeout", type=float, default=d.request_timeout, help="seconds before a request "
                                                                                    "counts as a timeout")
    p.add_argument("--seed", type=int, default=d.seed, help="seeds arrivals, prompts and lengths")
    p.add_argument("--json", default=None, metavar="OUT", help="write the report as JSON")
    p.add_argument("--plot", default=None, metavar="OUT.png", help="write latency and throughput over time")
    p.add_argument("--no-progress", action="store_true", help="no live progress line")
    p.add_argument("--structured-fraction", type=float, default=0.0, help="this share of the requests carry a JSON "
                   "schema (guided_json / json_schema) that never completes within max_tokens")
    a = p.parse_args(argv)
    options = LoadOptions(a.qps, a.duration, a.num_requests, a.url, a.grpc, a.metrics_url, a.model, a.stream,
                          a.prompt_tokens, a.max_tokens, a.shared_prefix_tokens,
                          a.adapters.split(",") if a.adapters else None, a.max_in_flight, a.request_timeout, a.seed,
                          not a.no_progress, a.structured_fraction, a.prefix_groups)
    try:
        options.workload(["x"])  # check the distributions and bounds before connecting
        if a.qps <= 0 or (a.duration is not None and a.duration <= 0) or (a.num_requests is not None and a.num_requests < 1):
            raise ValueError("--qps, --duration and --num-requests must be positive")
    except ValueError as e:
        p.error(str(e))
    return options, a


def main(argv=None):
    options, args = parse_args(argv)
    try:
        import uvloop
        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    report, records = runner(run_load(options))
    print(format_report(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(without_nan(report), f, indent=2, allow_nan=False)
    if args.plot:
        target = options.grpc or options.url
        plot(records, args.plot, f"{target}: {options.qps:g} qps, prompt {options.prompt_tokens}, "
                                 f"output {options.max_tokens}")


if __name__ == "__main__":
    main()
