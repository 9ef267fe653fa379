"""bench.load: its arrival process, workload and percentile maths, and short runs against a real lmserve process."""
import asyncio
import json
import math
import random
import statistics
import subprocess
import sys

import numpy as np
import pytest

from bench.load import LoadOptions, run_load
from bench.report import histogram_quantile, percentile, server_delta, without_nan
from bench.workload import Distribution, Workload, poisson_arrivals
from bench.processes import ROOT, start_lmserve


# --- the workload ---------------------------------------------------------------------------------
def test_arrivals_are_a_poisson_process_at_the_offered_rate():
    times = poisson_arrivals(random.Random(1), qps=200, num_requests=20000)
    gaps = np.diff([0.0, *times])
    assert gaps.mean() == pytest.approx(1 / 200, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.03)       # exponential gaps: CV 1
    counts = np.bincount(np.array(times, dtype=int))[:-1]                  # arrivals per whole second
    assert counts.var() / counts.mean() == pytest.approx(1.0, abs=0.35)  # Poisson counts: variance = mean
    assert all(b > a for a, b in zip(times, times[1:]))


def test_a_duration_bound_sends_about_qps_times_duration():
    times = poisson_arrivals(random.Random(2), qps=50, duration=40)
    assert abs(len(times) - 2000) < 4 * math.sqrt(2000) and times[-1] < 40


def test_the_same_seed_plans_the_same_requests():
    w = Workload(20, Distribution.parse("4:12"), Distribution.parse("normal:8:3"), ["base", "a"], num_requests=50,
                 shared_prefix_tokens=5, seed=7)
    vocab = list(range(10, 60))
    plan, again = w.plan(vocab), w.plan(vocab)
    assert plan == again and plan != Workload(20, w.prompt_tokens, w.max_tokens, w.models, num_requests=50,
                                              shared_prefix_tokens=5, seed=8).plan(vocab)
    assert [p.model for p in plan[:4]] == ["base", "a", "base", "a"]
    assert all(9 <= len(p.prompt_token_ids) <= 17 and set(p.prompt_token_ids) <= set(vocab) for p in plan)
    assert len({tuple(p.prompt_token_ids[:5]) for p in plan}) == 1       # the shared prefix
    assert all(p.max_tokens >= 1 for p in plan)


def test_token_count_specs():
    rng = random.Random(0)
    assert Distribution.parse("32").sample(rng) == 32
    assert {Distribution.parse("3:5").sample(rng) for _ in range(200)} == {3, 4, 5}
    normal = [Distribution.parse("normal:100:10").sample(rng) for _ in range(2000)]
    assert statistics.mean(normal) == pytest.approx(100, abs=1) and statistics.stdev(normal) == pytest.approx(10, abs=1)
    for bad in ["0", "5:3", "x", "normal:10", "normal:10:-1", "1:2:3"]:
        with pytest.raises(ValueError, match="token count"):
            Distribution.parse(bad)


# --- the maths of the report ------------------------------------------------------------------------
def test_percentiles_match_numpy():
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 100, 1001):
        values = rng.exponential(size=n).tolist()
        for q in (0, 1, 50, 90, 99, 99.9, 100):
            assert percentile(values, q) == pytest.approx(np.percentile(values, q), rel=1e-12)
    assert math.isnan(percentile([], 50))


def test_histogram_quantile_interpolates_like_prometheus():
    buckets = [(0.1, 10), (0.5, 30), (1.0, 40), (math.inf, 40)]    # cumulative
    assert histogram_quantile(buckets, 0.25) == pytest.approx(0.1)            # rank 10: the first bucket's top
    assert histogram_quantile(buckets, 0.5) == pytest.approx(0.1 + 0.4 * 10 / 20)
    assert histogram_quantile(buckets, 0.99) == pytest.approx(0.5 + 0.5 * 9.6 / 10)
    assert math.isnan(histogram_quantile([(1.0, 0), (math.inf, 0)], 0.5))   # nothing observed


# --- against a real server ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(llama):
    process = start_lmserve("--model", llama, "--served-model-name", "tiny", "--max-model-len", "96",
                           "--kv-cache-tokens", "4096", "--max-wait-ms", "2")
    yield process
    process.stop()


def test_streamed_http_run_reports_what_client_and_server_saw(server):
    options = LoadOptions(qps=40, num_requests=40, url=server.url, stream=True, prompt_tokens="4:12",
                          max_tokens="3:9", shared_prefix_tokens=4, seed=3, progress=False)
    report, records = asyncio.run(run_load(options))
    c, s = report["client"], report["server"]
    assert (c["sent"], c["completed"], c["failed"], c["errors"]) == (40, 40, 0, {})
    # ignore_eos: each request generates exactly its planned max_tokens; prompts are the planned lengths
    assert all(r.output_tokens == r.max_tokens and r.prompt_tokens == r.planned_prompt_tokens for r in records)
    assert c["output_tokens"] == sum(r.output_tokens for r in records)
    assert c["prompt_tokens"] == sum(r.prompt_tokens for r in records)
    assert len({r.max_tokens for r in records}) > 3 and len({r.planned_prompt_tokens for r in records}) > 3
    assert all(len(r.chunk_times) == r.output_tokens for r in records)   # one SSE chunk per token
    assert c["itl_s"]["count"] == c["output_tokens"] - 40
    for key in ("ttft_s", "itl_s", "e2e_s"):
        d = c[key]
        assert 0 < d["p50"] <= d["p90"] <= d["p99"] <= d["max"]
    assert c["ttft_s"]["max"] <= c["e2e_s"]["max"]
    assert c["achieved_rps"] <= c["sent_rps"] * 1.5 and c["output_tokens_per_s"] > 0
    # the server's counters moved by exactly this run's traffic
    assert s["requests_finished"] == 40 and s["finished_by_reason"] == {"length": 40}
    assert s["generation_tokens"] == c["output_tokens"] and s["prompt_tokens"] == c["prompt_tokens"]
    assert s["ttft_s"]["count"] == 40 and s["itl_s"]["count"] == c["itl_s"]["count"]
    json.dumps(without_nan(report), allow_nan=False)  # what --json writes


def test_grpc_run_and_errors_counted_by_type(server):
    # Prompts of 90-95 tokens leave room for some outputs of up to 8 tokens in a 96-token context, not all.
    options = LoadOptions(qps=50, num_requests=24, grpc=server.grpc_target, metrics_url=server.url + "/metrics",
                          prompt_tokens="86:92", max_tokens="4:8", seed=1, progress=False)
    report, records = asyncio.run(run_load(options))
    c = report["client"]
    too_long = [r for r in records if not r.ok]
    assert too_long and c["errors"] == {"grpc_INVALID_ARGUMENT": len(too_long)}
    assert "max_tokens" in c["error_examples"]["grpc_INVALID_ARGUMENT"]
    assert c["completed"] == 24 - len(too_long) == report["server"]["requests_finished"]
    assert c["ttft_s"]["count"] == c["completed"]   # unary: the first token is the whole response


def test_unknown_model_is_refused_before_any_request(server):
    with pytest.raises(SystemExit, match="does not serve nope"):
        asyncio.run(run_load(LoadOptions(qps=5, num_requests=2, url=server.url, adapters=["nope"], progress=False)))


def test_command_line_writes_table_json_and_plot(server, tmp_path):
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    proc = subprocess.run([sys.executable, "-m", "bench.load", "--qps", "30", "--num-requests", "12", "--url", server.url,
                           "--stream", "--max-tokens", "4", "--json", str(out), "--plot", str(png)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "completed 12" in proc.stdout and "client TTFT" in proc.stdout and "server end-to-end" in proc.stdout
    report = json.loads(out.read_text())
    assert report["client"]["output_tokens"] == 48 and report["options"]["qps"] == 30
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_server_delta_counts_only_the_difference():
    before = "\n".join(["lmserve_generation_tokens_total{model_name=\"m\"} 10.0",
                        "lmserve_requests_finished_total{finished_reason=\"length\",model_name=\"m\"} 2.0"])
    after = "\n".join(["lmserve_generation_tokens_total{model_name=\"m\"} 25.0",
                       "lmserve_generation_tokens_total{model_name=\"a\"} 5.0",
                       "lmserve_requests_finished_total{finished_reason=\"length\",model_name=\"m\"} 5.0",
                       "lmserve_requests_finished_total{finished_reason=\"stop\",model_name=\"a\"} 1.0"])
    d = server_delta(before, after)
    assert d["generation_tokens"] == 20 and d["requests_finished"] == 4
    assert d["finished_by_reason"] == {"length": 3, "stop": 1}
