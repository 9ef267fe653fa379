"""bench.versus_transformers: a short run prints both engines per mode and the ratios against the targets."""
import asyncio
import json

from bench.versus_transformers import format_table, main, parse_args


def test_a_short_run_times_both_engines_and_writes_the_figures(llama, tmp_path, capsys):
    out = tmp_path / "versus.json"
    results = asyncio.run(main(parse_args(["--model", llama, "--modes", "float32,int8", "--batch", "2",
                                           "--prompt-tokens", "8", "--output-tokens", "24", "--json", str(out)])))
    assert set(results) == {("float32", 1), ("float32", 2), ("hf-float32", 1), ("hf-float32", 2), ("int8", 1),
                            ("int8", 2)}
    assert all(r["tokens_per_s"] > 0 for r in results.values())
    assert results[("float32", 1)]["percent_of_floor"] > 0 and results[("float32", 2)]["percent_of_floor"] is None
    printed = capsys.readouterr().out
    assert "| float32 batch 1 vs transformers |" in printed and "| int8 batch 1 vs our float32 |" in printed
    assert "int4 batch 1" not in printed   # not measured, so not claimed
    assert json.loads(out.read_text())["hf-float32@2"]["tokens_per_s"] == results[("hf-float32", 2)]["tokens_per_s"]


def test_a_missed_target_says_so():
    results = {("float32", 1): {"tokens_per_s": 10.0, "percent_of_floor": 30.0},
               ("hf-float32", 1): {"tokens_per_s": 10.0, "percent_of_floor": None}}
    assert "| float32 batch 1 vs transformers | 1.00x | MISSED < 1.1x |" in format_table(results, 16, 1e9)
