"""A client that reads its stream one byte a second must not stall anyone else: its response backs up in
its own connection (the server stops writing to it) while the engine and every other client go on."""
import json
import socket
import threading
import time

import httpx
import pytest

from bench.processes import start_lmserve
from bench.report import metric_total, parse_metrics


@pytest.fixture(scope="module")
def server(llama):
    process = start_lmserve("--model", llama, "--served-model-name", "tiny", "--max-model-len", "512",
                            "--kv-cache-tokens", "8192")
    yield process
    process.stop()


class SlowReader:
    """A raw socket with a small receive buffer that reads one byte a second on its own thread."""

    def __init__(self, url: str, body: dict):
        host, port = url.removeprefix("http://").split(":")
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.connect((host, int(port)))
        data = json.dumps(body).encode()
        self.sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
        self.received = b""
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        while not self.stopped.wait(1.0):
            byte = self.sock.recv(1)
            if not byte:
                return
            self.received += byte

    def close(self):
        self.stopped.set()
        self.thread.join()
        self.sock.close()


def _metric(url: str, name: str) -> float:
    return metric_total(parse_metrics(httpx.get(url + "/metrics").text), name)


def test_a_client_reading_one_byte_a_second_does_not_stall_the_others(server):
    # 4 copies x 500 tokens with 20 top logprobs each: megabytes of SSE, far more than the socket buffers hold
    slow = SlowReader(server.url, {"model": "tiny", "prompt": "Hello", "stream": True, "n": 4, "max_tokens": 500,
                                   "ignore_eos": True, "logprobs": 20, "temperature": 0})
    try:
        time.sleep(2)
        assert slow.received.startswith(b"H")  # it is being served, a byte a second
        start = time.monotonic()
        with httpx.Client(base_url=server.url, timeout=60) as client:
            for _ in range(3):
                r = client.post("/v1/completions", json={"model": "tiny", "prompt": "Hi", "max_tokens": 16,
                                                         "ignore_eos": True, "stream": True})
                assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
                r = client.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 16, "ignore_eos": True,
                                                              "messages": [{"role": "user", "content": "Hi"}]})
                assert r.json()["usage"]["completion_tokens"] == 16
        others = time.monotonic() - start
        assert others < 30, f"6 short requests took {others:.1f} s beside the slow reader"
        assert len(slow.received) < 64  # the slow reader was still at its first bytes throughout
    finally:
        slow.close()
    # its connection gone, the server ends its request and frees its blocks
    deadline = time.monotonic() + 30
    while (_metric(server.url, "lmserve_num_requests_running") or _metric(server.url, "lmserve_kv_cache_usage_ratio")):
        assert time.monotonic() < deadline, "the slow reader's request was not ended after it disconnected"
        time.sleep(0.2)
