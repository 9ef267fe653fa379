"""bench.decode: the bytes a decode step reads, the floor it implies, and a short run of the script."""
import asyncio
import json

import pytest

from bench.decode import bytes_per_step, main, measure, parse_args
from server.config import EngineConfig
from server.engine_client import in_process_engine


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_step_reads_every_weight_but_the_untied_embedding_plus_the_kv_cache(checkpoints, arch):
    engine = in_process_engine(EngineConfig(model=checkpoints[arch], kv_cache_tokens=1024))
    model, cfg = engine.core.model, engine.core.model.config
    embedding = model.model.embed_tokens.weight.numel() * 4
    weights = sum(p.numel() * 4 for p in model.parameters()) - (0 if cfg.tie_word_embeddings else embedding)
    kv_per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4
    assert bytes_per_step(engine, 10, 1) == weights + 10 * kv_per_token
    assert bytes_per_step(engine, 10, 3) - bytes_per_step(engine, 10, 1) == 2 * 10 * kv_per_token


def test_an_int8_lm_head_is_read_as_its_codes_by_the_compiled_step_and_as_floats_eagerly(llama, monkeypatch):
    # nothing compiles: bytes_per_step reads only whether the runner has a compiled step
    monkeypatch.setattr("batching.engine_model.build_compiled_decode", lambda *args: object())
    engine = in_process_engine(EngineConfig(model=llama, device="cpu", kv_cache_tokens=1024, quant="int8",
                                            compile=True))
    model = engine.core.model
    vocab, hidden = model.lm_head.weight.shape
    codes = vocab * hidden + vocab * 4   # int8 codes, float32 scales
    assert model.weight_bytes == sum(p.numel() * p.element_size() for p in model.parameters()) + codes
    compiled = bytes_per_step(engine, 10, 1)
    engine.core.runner.compiled_decode = None
    assert bytes_per_step(engine, 10, 1) - compiled == vocab * hidden * 4 - codes


def test_the_report_relates_measured_speed_to_the_floor(llama):
    engine = in_process_engine(EngineConfig(model=llama, kv_cache_tokens=1024, max_wait_ms=0))
    r = asyncio.run(measure(engine, batch=2, prompt_tokens=8, output_tokens=12, bandwidth=50e9))
    assert r.context_tokens == 20 and r.copy_gb_per_s == 50
    assert r.floor_tokens_per_s == pytest.approx(50e9 / r.bytes_per_step)
    assert r.total_tokens_per_s == pytest.approx(2 * r.tokens_per_s)
    assert r.tokens_per_s == pytest.approx(1000 / r.inter_token_ms_p50)
    assert r.inter_token_ms_p90 >= r.inter_token_ms_p50 > 0
    assert r.percent_of_floor == pytest.approx(100 * r.tokens_per_s / r.floor_tokens_per_s)


def test_the_command_prints_and_writes_its_report(llama, tmp_path, capsys):
    out = tmp_path / "decode.json"
    report = asyncio.run(main(parse_args(["--model", llama, "--prompt-tokens", "8", "--output-tokens", "8",
                                          "--json", str(out)])))
    printed = capsys.readouterr().out
    assert "of the bandwidth floor" in printed and "copy bandwidth" in printed
    saved = json.loads(out.read_text())
    assert saved["batch"] == 1 and saved["tokens_per_s"] == report.tokens_per_s and "percent_of_floor" in saved
