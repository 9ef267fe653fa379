"""A server (HTTP and gRPC) on a background thread of the test process, its engine core in-process or in a process
of its own, so tests can call it and (in-process) inspect its engine."""
import asyncio
import json
import re
import threading
import time

import httpx

import pytest
import torch
import uvicorn

from bench.processes import free_port
from server.config import EngineConfig
from server.engine_client import in_process_engine
from server.mp_engine_client import MultiprocessEngineClient, start_engine_core
from server.grpc_service import start_grpc_server
from server.http.app import build_app
from server.tiny_model import build_checkpoint
from tests.conftest import TINY

MODEL_NAME = "tiny-llama"


def metric_sums(text: str) -> dict[str, float]:
    """Prometheus text: each sample name's values summed over their labels."""
    found: dict[str, float] = {}
    for name, value in re.findall(r"^([a-z_]+)(?:\{[^}]*\})? (\S+)$", text, re.M):
        found[name] = found.get(name, 0.0) + float(value)
    return found


class LiveServer:
    """multiprocess: the engine core in a process of its own (as python -m server runs it), else on the server's
    event loop, where tests can reach into it through engine.core."""

    def __init__(self, model_path: str, access=None, multiprocess: bool = False, tool_call_parser: str = "auto",
                 reasoning_parser: str | None = None, open_metrics: bool = False, **engine_kwargs):
        config = EngineConfig(model=model_path, served_model_name=MODEL_NAME, max_wait_ms=1, **engine_kwargs)
        self.multiprocess = multiprocess
        if multiprocess:
            self.core_process, self.address = start_engine_core(config, "warning")
            self.engine = None   # connected on the server's own event loop
        else:
            self.engine = in_process_engine(config)
        self.port, self.grpc_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.grpc_target = f"127.0.0.1:{self.grpc_port}"
        self.access = access
        self.tool_call_parser, self.reasoning_parser = tool_call_parser, reasoning_parser
        self.open_metrics = open_metrics
        self.server: uvicorn.Server | None = None
        self.thread = threading.Thread(target=lambda: asyncio.run(self._serve()), daemon=True)

    async def _serve(self):
        if self.multiprocess:
            self.engine = await MultiprocessEngineClient.connect(self.address, process=self.core_process, timeout=120)
        app = build_app(self.engine, self.access, tool_call_parser=self.tool_call_parser,
                        reasoning_parser=self.reasoning_parser, open_metrics=self.open_metrics)
        # keep-alive longer than any pause between a test's requests: a connection the server closes while a
        # client (max_retries=0) reuses it is a connection reset, not what a test is about
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", loop="asyncio",
                                timeout_keep_alive=120)
        self.server = uvicorn.Server(config)
        grpc_server, _ = await start_grpc_server(self.engine, "127.0.0.1", self.grpc_port, self.access)
        try:
            await self.server.serve()
        finally:
            await grpc_server.stop(grace=None)
            if self.multiprocess:
                await self.engine.shutdown()

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 120
        while self.server is None or not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def metrics(self) -> dict[str, float]:
        return metric_sums(httpx.get(self.url + "/metrics", timeout=30).text)

    def num_steps(self) -> int:
        """Engine steps so far (the batch-size histogram counts one per step)."""
        return int(self.metrics()["lmserve_batch_size_count"])

    def wait_until_all_blocks_free(self, timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.multiprocess:
                m = self.metrics()
                if not (self.engine._requests or m["lmserve_kv_cache_usage_ratio"] or m["lmserve_num_requests_running"]
                        or m["lmserve_num_requests_waiting"]):
                    return True
            else:
                bm = self.engine.core.block_manager
                if bm.num_free_blocks == bm.num_blocks and not self.engine._requests and not self.engine.core._seqs:
                    return True
            time.sleep(0.01)
        return False


@pytest.fixture(scope="module", params=["in-process", "multiprocess"])
def live(llama, request):
    """The same tests against both engine clients."""
    with LiveServer(llama, multiprocess=request.param == "multiprocess", kv_cache_tokens=8192) as server:
        yield server


ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_peft_adapter(base: str, out, seed: int, targets=ALL, rank=8, alpha=16, rslora=False) -> str:
    """A PEFT adapter with random non-zero A and B, as peft itself writes it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False, use_rslora=rslora)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.mul_(0.5)  # a clear change of the output that keeps the logits in a sane range
    peft_model.save_pretrained(str(out))
    return str(out)


class MergedReference:
    """peft's own merged model on the same weights: the ground truth for an adapter's greedy output."""

    def __init__(self, base: str, adapter: str | None, weights: dict[str, torch.Tensor] | None = None):
        """weights: replacements for some of the base's weights (e.g. what a quantized model computes with)."""
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        if weights:
            unknown = model.load_state_dict(weights, strict=False).unexpected_keys
            assert not unknown, unknown
        self.model = (PeftModel.from_pretrained(model, adapter).merge_and_unload() if adapter else model).eval()

    def greedy(self, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        ids = torch.tensor([prompt_ids])
        out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                  do_sample=False, pad_token_id=2)
        return out[0, len(prompt_ids):].tolist()


@pytest.fixture(scope="session")
def peft_adapters(llama, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("loras")
    return {"alpha": make_peft_adapter(llama, root / "alpha", seed=1),
            "beta": make_peft_adapter(llama, root / "beta", seed=2, targets=["q_proj", "v_proj"], rank=4,
                                      rslora=True)}


# A float model and its 4-bit act-order GPTQ checkpoint (python -m server.quantize on calibration text).
@pytest.fixture(scope="session")
def float_model(tmp_path_factory) -> str:
    return str(build_checkpoint(tmp_path_factory.mktemp("qmodel") / "llama", seed=3, std=0.05, **TINY))


@pytest.fixture(scope="session")
def calibration(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("calib") / "calib.jsonl"
    words = "the model serves requests quickly while the cache keeps every block it needs for later tokens".split()
    lines = [{"text": " ".join(words[(i * 7 + j) % len(words)] for j in range(40))} for i in range(24)]
    lines += [{"prompt": "What is a KV cache? ", "completion": "It stores keys and values."},
              {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]}]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def gptq_checkpoint(float_model, calibration, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("gptq") / "llama-gptq"
    from server.quantize import main
    main(["--model", float_model, "--out", str(out), "--method", "gptq", "--bits", "4", "--group-size", "32",
          "--act-order", "--calibration", calibration, "--device", "cpu"])
    return str(out)
