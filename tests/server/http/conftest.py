"""An in-process server on a background thread, so tests can both call it over HTTP and inspect its engine."""
import asyncio
import socket
import threading
import time

import pytest
import uvicorn

from server.config import EngineConfig
from server.engine import AsyncEngine
from server.http.app import build_app

MODEL_NAME = "tiny-llama"


class LiveServer:
    def __init__(self, model_path: str, **engine_kwargs):
        self.engine = AsyncEngine(EngineConfig(model=model_path, served_model_name=MODEL_NAME, max_wait_ms=1,
                                               **engine_kwargs))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(build_app(self.engine), host="127.0.0.1", port=self.port,
                                log_level="warning", loop="asyncio")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

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
        bm = self.engine.block_manager
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
