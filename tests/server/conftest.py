"""An in-process server (HTTP and gRPC) on a background thread, so tests can call it and inspect its engine."""
import asyncio
import threading
import time

import pytest
import torch
import uvicorn

from bench.processes import free_port
from server.config import EngineConfig
from server.engine_client import in_process_engine
from server.grpc_service import start_grpc_server
from server.http.app import build_app

MODEL_NAME = "tiny-llama"


class LiveServer:
    def __init__(self, model_path: str, access=None, **engine_kwargs):
        self.engine = in_process_engine(EngineConfig(model=model_path, served_model_name=MODEL_NAME, max_wait_ms=1,
                                               **engine_kwargs))
        self.port, self.grpc_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.grpc_target = f"127.0.0.1:{self.grpc_port}"
        self.access = access
        config = uvicorn.Config(build_app(self.engine, access), host="127.0.0.1", port=self.port,
                                log_level="warning", loop="asyncio")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=lambda: asyncio.run(self._serve()), daemon=True)

    async def _serve(self):
        grpc_server, _ = await start_grpc_server(self.engine, "127.0.0.1", self.grpc_port, self.access)
        try:
            await self.server.serve()
        finally:
            await grpc_server.stop(grace=None)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def wait_until_all_blocks_free(self, timeout: float = 5.0) -> bool:
        bm = self.engine.core.block_manager
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if bm.num_free_blocks == bm.num_blocks and not self.engine._requests:
                return True
            time.sleep(0.01)
        return False


@pytest.fixture(scope="module")
def live(llama):
    with LiveServer(llama, kv_cache_tokens=8192) as server:
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
