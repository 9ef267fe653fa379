"""Servers as child processes on loopback ports: started, waited for until /health answers, stopped."""
import os
import socket
import subprocess
import sys
import tempfile
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
    log: Path
    grpc_target: str | None = None

    def output(self) -> str:
        """What the server has printed so far (stdout and stderr)."""
        return self.log.read_text(errors="replace")

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.unlink(missing_ok=True)


def start(module: str, *args: str, port: int, timeout: float = 600, **extra) -> ServerProcess:
    """python -m module args, listening on port; returns once GET /health answers 200."""
    return launch([sys.executable, "-m", module, "--port", str(port), *args], port, timeout, **extra)


def launch(argv: list[str], port: int, timeout: float = 600, **extra) -> ServerProcess:
    """Run argv (a server that listens on port); returns once GET /health answers 200."""
    name = " ".join(argv[1:3])
    # A file, not a pipe: a pipe nobody reads fills up and blocks the server on its next log line.
    fd, log = tempfile.mkstemp(prefix="lmserve-", suffix=".log")
    with os.fdopen(fd, "wb") as out:
        proc = subprocess.Popen(argv, cwd=ROOT, env=os.environ.copy(), stdout=out, stderr=subprocess.STDOUT)
    log = Path(log)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as r:
                if r.status == 200:
                    return ServerProcess(proc, url, log, **extra)
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited: {log.read_text(errors='replace')}") from None
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{name} did not become healthy in {timeout} s")


def start_lmserve(*args: str, timeout: float = 600) -> ServerProcess:
    grpc_port = free_port()
    return start("server", "--grpc-port", str(grpc_port), *args, port=free_port(), timeout=timeout,
                 grpc_target=f"127.0.0.1:{grpc_port}")
