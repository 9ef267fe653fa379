"""bench.kernels runs end to end (tiny shapes; on CPU in Triton's interpreter) and reports every kernel."""
import json

import torch

from bench.kernels import copy_bandwidth, main


def test_smoke_run_reports_every_kernel(tmp_path, capsys):
    out = tmp_path / "rows.json"
    main(["--smoke", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert {r["op"] for r in rows} == {"fp16 torch.matmul", "int8 w8a16", "int4 gptq g128", "paged attention default",
                                       "paged attention tile 16", "paged attention no split",
                                       "rms_norm + residual", "silu_and_mul", "lora r=8 x1 adapters",
                                       "lora r=8 x4 adapters"}
    assert all(r["ms"] > 0 and r["gbps"] >= 0 for r in rows)
    assert "% floor" in capsys.readouterr().out


def test_copy_bandwidth_counts_bytes_read_and_written():
    assert 1e8 < copy_bandwidth(torch.device("cpu"), nbytes=1 << 24, graph=False) < 1e13
