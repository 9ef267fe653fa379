"""An in-process server (HTTP and gRPC) on a background thread, so tests can call it and inspect its engine."""
import asyncio
import socket
import threading
import time

import pytest
import uvicorn

from server.config import EngineConfig
from server.engine import AsyncEngine
from server.grpc_service import start_grpc_server
from server.http.app import build_app

MODEL_NAME = "tiny-llama"


class LiveServer:
    def __init__(self, model_path: str, **engine_kwargs):
        self.engine = AsyncEngine(EngineConfig(model=model_path, served_model_name=MODEL_NAME, max_wait_ms=1,
                                               **engine_kwargs))
        self.port, self.grpc_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.grpc_target = f"127.0.0.1:{self.grpc_port}"
        config = uvicorn.Config(build_app(self.engine), host="127.0.0.1", port=self.port,
                                log_level="warning", loop="asyncio")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=lambda: asyncio.run(self._serve()), daemon=True)

    async def _serve(self):
        grpc_server, _ = await start_grpc_server(self.engine, "127.0.0.1", self.grpc_port)
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
        bm = self.engine.block_manager
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if bm.num_free_blocks == bm.num_blocks and not self.engine._requests:
                return True
            time.sleep(0.01)
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def live(llama):
    with LiveServer(llama, kv_cache_tokens=8192) as server:
        yield server
