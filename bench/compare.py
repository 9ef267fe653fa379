"""python -m bench.compare: the same seeded workload against lmserve and transformers-`generate` baselines.

Starts lmserve (`python -m server`) and each baseline (`python -m bench.baseline_server`: one request at a
time, and static batches) on the same model, then runs bench.load against each in turn, --rounds times with
the order rotated (round r uses seed + r for every server, so no server sees a prompt twice). Prints the
median of each figure over the rounds and lmserve's ratio to each baseline, and writes the table, the exact
command and the machine to bench/RESULTS.md.

  python -m bench.compare --num-requests 200 --qps 1000 --prompt-tokens 8:24 --max-tokens 16:32
"""
import argparse
import asyncio
import datetime
import os
import platform
import shlex
import statistics
import sys
from pathlib import Path

import torch

from bench.load import LoadOptions, run_load
from bench.processes import free_port, start, start_lmserve

ROWS = [("output tok/s", ("output_tokens_per_s",), True), ("requests/s", ("achieved_rps",), True),
        ("TTFT p50 (s)", ("ttft_s", "p50"), False), ("TTFT p99 (s)", ("ttft_s", "p99"), False),
        ("latency p50 (s)", ("e2e_s", "p50"), False), ("latency p99 (s)", ("e2e_s", "p99"), False)]


def figure(report: dict, path: tuple[str, ...]) -> float:
    value = report["client"]
    for key in path:
        value = value[key]
    return value


def table(medians: dict[str, dict[str, float]]) -> str:
    """Markdown: a row per figure, a column per server, then lmserve's advantage over each baseline
    (throughput: lmserve / baseline; latency: baseline / lmserve; above 1 means lmserve is better)."""
    servers = list(medians)
    baselines = servers[1:]
    head = "| | " + " | ".join(servers) + " | " + " | ".join(f"lmserve vs {b}" for b in baselines) + " |"
    lines = [head, "|---" * (1 + len(servers) + len(baselines)) + "|"]
    for label, _, higher_better in ROWS:
        ours = medians["lmserve"][label]
        cells = [f"{medians[s][label]:.4g}" for s in servers]
        ratios = [(ours / medians[b][label] if higher_better else medians[b][label] / ours) for b in baselines]
        lines.append(f"| {label} | " + " | ".join(cells) + " | " + " | ".join(f"{r:.1f}x" for r in ratios) + " |")
    return "\n".join(lines)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
    return f"{cpu}, {os.cpu_count()} cores{gpu}; torch {torch.__version__}, Python {platform.python_version()}"


def record(results: Path, command: str, workload: str, body: str):
    """Insert an entry at the top of RESULTS.md's entries (newest first)."""
    text = results.read_text() if results.exists() else "# Recorded results\n\nEach entry: the command, the machine, what it printed. Newest first.\n"
    entry = (f"## {datetime.date.today()}: lmserve vs transformers baselines (bench.compare)\n\n"
             f"Machine: {machine()}.\n\n```\n{command}\n```\n{workload}\n\n{body}\n\n")
    marker = "\n## "
    cut = text.find(marker)
    text = text.rstrip("\n") + "\n\n" + entry if cut < 0 else text[:cut + 1] + entry + text[cut + 1:]
    results.write_text(text)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="as python -m server --model (default: the default model; `tiny` for the CPU throughput figures)")
    p.add_argument("--qps", type=float, default=1000.0, help="offered rate; far above capacity measures saturation")
    p.add_argument("--num-requests", type=int, default=200)
    p.add_argument("--prompt-tokens", default="8:24")
    p.add_argument("--max-tokens", default="16:32")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--baselines", default="sequential,static", help="comma-separated: sequential, static")
    p.add_argument("--static-batch-size", type=int, default=16)
    p.add_argument("--server-arg", action="append", default=[], help="an extra python -m server flag (repeatable), "
                                                                     "e.g. --server-arg=--max-batch-size=256")
    p.add_argument("--results", default=str(Path(__file__).with_name("RESULTS.md")), help="file to record into")
    p.add_argument("--no-record", action="store_true", help="print only")
    args = p.parse_args(argv)
    model = ["--model", args.model] if args.model else []
    servers = {"lmserve": lambda: start_lmserve(*model, *args.server_arg)}
    for b in args.baselines.split(",") if args.baselines else []:
        if b not in ("sequential", "static"):
            p.error(f"--baselines takes sequential and static; got {b!r}")
        extra = ["--batch-size", str(args.static_batch_size)] if b == "static" else []
        servers[f"hf-{b}"] = lambda b=b, extra=extra: start("bench.baseline_server", "--mode", b, *model, *extra,
                                                            port=free_port())
    running = {}
    try:
        for name, launch in servers.items():
            print(f"starting {name} ...", file=sys.stderr)
            running[name] = launch()
        reports: dict[str, list[dict]] = {name: [] for name in running}
        names = list(running)
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                options = LoadOptions(args.qps, None, args.num_requests, running[name].url, stream=True,
                                      prompt_tokens=args.prompt_tokens, max_tokens=args.max_tokens, seed=args.seed + r,
                                      progress=False)
                asyncio.run(run_load(LoadOptions(50, None, 4, running[name].url, max_tokens="4", seed=10**6,
                                                 progress=False)))   # warm-up
                report, _ = asyncio.run(run_load(options))
                c = report["client"]
                print(f"round {r + 1} {name:>14}: {c['output_tokens_per_s']:8.1f} output tok/s, "
                      f"{c['completed']}/{c['sent']} completed, TTFT p50 {c['ttft_s'].get('p50', float('nan')):.3f} s",
                      file=sys.stderr)
                reports[name].append(report)
    finally:
        for process in running.values():
            process.stop()
    failed = {n: sum(r["client"]["failed"] for r in rs) for n, rs in reports.items()}
    medians = {n: {label: statistics.median(figure(r, path) for r in rs) for label, path, _ in ROWS}
               for n, rs in reports.items()}
    body = table(medians)
    workload = (f"Workload: {args.num_requests} requests offered at {args.qps:g}/s (Poisson), prompt {args.prompt_tokens} "
                f"tokens, output {args.max_tokens} tokens (ignore_eos), streamed; medians of {args.rounds} rounds; "
                f"failed requests: {failed}.")
    print(workload)
    print(body)
    if not args.no_record:
        command = "python -m bench.compare " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
        record(Path(args.results), command, workload, body)
        print(f"recorded in {args.results}")
    return medians


if __name__ == "__main__":
    main()
