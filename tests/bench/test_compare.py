"""bench.compare and its transformers baselines, on the test checkpoint with a handful of requests."""
import asyncio
import json
import urllib.request

import pytest
from transformers import AutoTokenizer

from bench.compare import main, table
from bench.load import LoadOptions, run_load
from bench.processes import free_port, start


@pytest.mark.parametrize("mode", ["sequential", "static"])
def test_baseline_server_answers_the_load_generator_with_transformers_tokens(llama, hf_reference, mode):
    server = start("bench.baseline_server", "--model", llama, "--mode", mode, "--batch-size", "4",
                   "--served-model-name", "tiny", port=free_port(), timeout=120)
    try:
        report, records = asyncio.run(run_load(LoadOptions(qps=100, num_requests=8, url=server.url, stream=True,
                                                           prompt_tokens="3:9", max_tokens="2:6", progress=False)))
        body = json.dumps({"model": "tiny", "prompt": [5, 6, 7, 8], "max_tokens": 6, "ignore_eos": True}).encode()
        with urllib.request.urlopen(urllib.request.Request(server.url + "/v1/completions", body,
                                                           {"Content-Type": "application/json"})) as r:
            text = json.loads(r.read())["choices"][0]["text"]
    finally:
        server.stop()
    assert report["client"]["completed"] == 8 and report["server"] is None     # no /metrics there
    assert all(r.output_tokens == r.max_tokens and len(r.chunk_times) == r.max_tokens for r in records)
    expected = hf_reference("llama").greedy([5, 6, 7, 8], 6, eos=False)
    assert text == AutoTokenizer.from_pretrained(llama).decode(expected)


def test_compare_records_a_ratio_table(llama, tmp_path, capsys):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Recorded results\n\nNewest first.\n\n## older entry\n\ntext\n")
    medians = main(["--model", llama, "--num-requests", "6", "--rounds", "1", "--baselines", "sequential",
                    "--max-tokens", "4", "--results", str(results), "--server-arg=--kv-cache-tokens=2048"])
    assert set(medians) == {"lmserve", "hf-sequential"}
    text = results.read_text()
    assert text.index("lmserve vs transformers baselines") < text.index("## older entry")
    assert "python -m bench.compare --model" in text and "| output tok/s |" in text and "lmserve vs hf-sequential" in text


def test_ratio_table_reads_above_one_when_lmserve_is_better():
    row = {"output tok/s": 100.0, "requests/s": 4.0, "TTFT p50 (s)": 0.1, "TTFT p99 (s)": 0.2,
           "latency p50 (s)": 1.0, "latency p99 (s)": 2.0}
    slower = {k: (v / 5 if "/s" in k else v * 5) for k, v in row.items()}
    lines = table({"lmserve": row, "hf-sequential": slower}).splitlines()
    assert all(line.endswith("| 5.0x |") for line in lines[2:])
