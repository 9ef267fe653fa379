"""What a load run measured: percentiles of the client's records, the server's /metrics before vs after,
a printable table, and an optional PNG of latency and throughput over time."""
import math
from collections import Counter

from bench.clients import RequestRecord

QUANTILES = (50, 90, 99)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile, interpolating linearly between closest ranks (numpy's default method)."""
    if not values:
        return math.nan
    s = sorted(values)
    rank = (len(s) - 1) * q / 100
    lo = math.floor(rank)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (rank - lo)


def distribution(values: list[float]) -> dict:
    if not values:
        return {"count": 0}
    return {"count": len(values), "mean": sum(values) / len(values),
            **{f"p{q}": percentile(values, q) for q in QUANTILES}, "max": max(values)}


def summarize(records: list[RequestRecord], offered_qps: float) -> dict:
    """Client-side figures of one run (seconds, on the run's clock, which starts at the first planned send)."""
    ok = [r for r in records if r.ok]
    errors = Counter(r.error for r in records if not r.ok)
    first_send = min((r.start for r in records), default=0.0)
    last_send = max((r.start for r in records), default=0.0)
    wall = max((r.end for r in records), default=0.0) - first_send
    output_tokens = sum(r.output_tokens for r in ok)
    prompt_tokens = sum(r.prompt_tokens for r in ok)
    streamed = [r for r in ok if len(r.chunk_times) > 1]
    return {
        "offered_qps": offered_qps,
        "sent": len(records), "completed": len(ok), "failed": len(records) - len(ok),
        "errors": dict(errors),
        "error_examples": {e: next(r.error_message for r in records if r.error == e) for e in errors},
        "send_window_s": last_send - first_send,
        "wall_s": wall,
        # sends per second while sending (n - 1 gaps), and completions per second over the whole run
        "sent_rps": (len(records) - 1) / (last_send - first_send) if last_send > first_send else math.nan,
        "achieved_rps": len(ok) / wall if wall > 0 else math.nan,
        "output_tokens": output_tokens, "prompt_tokens": prompt_tokens,
        "output_tokens_per_s": output_tokens / wall if wall > 0 else math.nan,
        "prompt_tokens_per_s": prompt_tokens / wall if wall > 0 else math.nan,
        "ttft_s": distribution([r.ttft for r in ok if r.ttft is not None]),
        "itl_s": distribution([b - a for r in streamed for a, b in zip(r.chunk_times, r.chunk_times[1:])]),
        "e2e_s": distribution([r.latency for r in ok]),
        "send_lag_s": distribution([r.start - r.scheduled for r in records]),
    }


# --- the server's view: Prometheus text from /metrics, before and after the run --------------------
def parse_metrics(text: str) -> dict[tuple, float]:
    """{(sample name, sorted label pairs): value} for every lmserve_ sample."""
    from prometheus_client.parser import text_string_to_metric_families
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith("lmserve_"):
                samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def metric_total(samples: dict, name: str, **match) -> float:
    """The sum of the samples called name whose labels include match."""
    return sum(v for (n, labels), v in samples.items()
               if n == name and all(dict(labels).get(k) == want for k, want in match.items()))


def histogram_quantile(buckets: list[tuple[float, float]], q: float) -> float:
    """Prometheus' histogram_quantile: q in [0, 1] over cumulative (upper bound, count) buckets,
    interpolating linearly inside the bucket that holds the rank."""
    buckets = sorted(buckets)
    total = buckets[-1][1] if buckets else 0
    if total <= 0:
        return math.nan
    rank = q * total
    prev_bound, prev_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return prev_bound
            return prev_bound + (bound - prev_bound) * (rank - prev_count) / max(count - prev_count, 1e-12)
        prev_bound, prev_count = bound, count
    return prev_bound


def _histogram(before: dict, after: dict, name: str) -> dict:
    le = {}
    for (n, labels), v in after.items():
        if n == f"{name}_bucket":
            bound = float(dict(labels)["le"])
            le[bound] = le.get(bound, 0.0) + v - before.get((n, labels), 0.0)
    count = metric_total(after, f"{name}_count") - metric_total(before, f"{name}_count")
    total = metric_total(after, f"{name}_sum") - metric_total(before, f"{name}_sum")
    out = {"count": count, "mean": total / count if count else math.nan}
    out |= {f"p{q}": histogram_quantile(list(le.items()), q / 100) for q in QUANTILES}
    return out


def server_delta(before_text: str, after_text: str) -> dict:
    """What the server counted during the run (counters and histograms after minus before)."""
    before, after = parse_metrics(before_text), parse_metrics(after_text)

    def delta(name, **match):
        return metric_total(after, name, **match) - metric_total(before, name, **match)

    reasons = sorted({dict(labels)["finished_reason"] for (n, labels) in after
                      if n == "lmserve_requests_finished_total"})
    return {
        "requests_finished": delta("lmserve_requests_finished_total"),
        "finished_by_reason": {r: delta("lmserve_requests_finished_total", finished_reason=r) for r in reasons},
        "prompt_tokens": delta("lmserve_prompt_tokens_total"),
        "generation_tokens": delta("lmserve_generation_tokens_total"),
        "preemptions": delta("lmserve_num_preemptions_total"),
        "queue_time_s": _histogram(before, after, "lmserve_request_queue_time_seconds"),
        "ttft_s": _histogram(before, after, "lmserve_time_to_first_token_seconds"),
        "itl_s": _histogram(before, after, "lmserve_inter_token_latency_seconds"),
        "e2e_s": _histogram(before, after, "lmserve_e2e_request_latency_seconds"),
        "batch_size": _histogram(before, after, "lmserve_batch_size"),
    }


# --- printing -------------------------------------------------------------------------------------
def format_report(report: dict) -> str:
    c = report["client"]
    lines = [f"model      {report['model']['base']} (requests for {', '.join(report['model']['sent'])})"] \
        if report.get("model") else []
    lines += [
        f"requests   sent {c['sent']}  completed {c['completed']}  failed {c['failed']}"
        + (f"  ({', '.join(f'{k}: {v}' for k, v in c['errors'].items())})" if c["errors"] else ""),
        f"rate       offered {c['offered_qps']:.1f}/s  sent {c['sent_rps']:.1f}/s  achieved {c['achieved_rps']:.1f}/s"
        f"  (over {c['wall_s']:.1f} s)",
        f"tokens     output {c['output_tokens_per_s']:.1f}/s  prompt {c['prompt_tokens_per_s']:.1f}/s"
        f"  ({c['output_tokens']} output, {c['prompt_tokens']} prompt)",
        "",
        f"{'seconds':<24}{'p50':>10}{'p90':>10}{'p99':>10}{'max':>10}{'mean':>10}",
    ]
    rows = [("client TTFT", c["ttft_s"]), ("client inter-token", c["itl_s"]), ("client end-to-end", c["e2e_s"]),
            ("client send lag", c["send_lag_s"])]
    if report.get("server"):
        s = report["server"]
        rows += [("server queue time", s["queue_time_s"]), ("server TTFT", s["ttft_s"]),
                 ("server inter-token", s["itl_s"]), ("server end-to-end", s["e2e_s"])]
    for label, d in rows:
        if d.get("count"):
            lines.append(f"{label:<24}" + "".join(_cell(d.get(k, math.nan)) for k in ("p50", "p90", "p99", "max", "mean")))
    if report.get("server"):
        s = report["server"]
        lines += ["", f"server     finished {s['requests_finished']:.0f} {s['finished_by_reason']}  "
                      f"generated {s['generation_tokens']:.0f}  prompt {s['prompt_tokens']:.0f}  "
                      f"preemptions {s['preemptions']:.0f}  mean batch {s['batch_size']['mean']:.1f}"]
    for kind, message in c["error_examples"].items():
        lines.append(f"error      {kind}: {message}")
    return "\n".join(lines)


def _cell(value: float) -> str:
    return f"{'-':>10}" if math.isnan(value) else f"{value:>10.4f}"


def without_nan(obj):
    """The report with NaN (a figure with nothing to measure) as None, so --json writes strict JSON."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: without_nan(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [without_nan(v) for v in obj]
    return obj


def plot(records: list[RequestRecord], path: str, title: str):
    """Per-second completions, output tokens, and TTFT / end-to-end percentiles by send time."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if r.ok]
    seconds = int(max((r.end for r in records), default=0)) + 1
    done, tokens = [0] * seconds, [0.0] * seconds
    by_send: list[list[RequestRecord]] = [[] for _ in range(seconds)]
    for r in ok:
        done[int(r.end)] += 1
        by_send[int(r.start)].append(r)
        times = r.chunk_times or [r.end]
        for t in times:  # spread the request's tokens over its chunks
            tokens[int(t)] += r.output_tokens / len(times)
    x = list(range(seconds))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    top.plot(x, done, label="completed requests/s")
    top.plot(x, [t / 10 for t in tokens], label="output tokens/s ÷ 10")
    top.set_ylabel("per second")
    top.legend()
    for label, value in (("TTFT", lambda r: r.ttft), ("end-to-end", lambda r: r.latency)):
        for q in (50, 99):
            ys = [percentile([v for v in map(value, rs) if v is not None], q) for rs in by_send]
            bottom.plot(x, ys, label=f"{label} p{q}")
    bottom.set_ylabel("seconds (by send time)")
    bottom.set_xlabel("run time (s)")
    bottom.set_yscale("log")
    bottom.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
