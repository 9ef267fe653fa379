"""`python -m server` as a real child process on loopback ports, for tests that need the whole program."""
import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    url: str
    grpc_target: str

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)


def start_server(*args: str, timeout: float = 120) -> ServerProcess:
    """Start python -m server with args on free ports and wait until /health answers 200."""
    port, grpc_port = free_port(), free_port()
    proc = subprocess.Popen([sys.executable, "-m", "server", "--port", str(port), "--grpc-port", str(grpc_port), *args],
                            cwd=ROOT, env=os.environ.copy(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as r:
                if r.status == 200:
                    return ServerProcess(proc, url, f"127.0.0.1:{grpc_port}")
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: {proc.stdout.read().decode()}") from None
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"server did not become healthy in {timeout} s")
