"""python -m server as processes: one engine core process behind one or more API processes. Requests are
counted once whichever API process serves them; SIGTERM drains every API process; the engine core or an API
process dying ends the server non-zero; in no case is a process left behind."""
import json
import os
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from bench.processes import start_lmserve
from tests.server.conftest import metric_sums


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def assert_all_gone(pids: list[int], timeout: float = 15):
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in pids if alive(p)], "processes left behind"


def pid_in_log(server, pattern: str) -> int:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        m = re.search(pattern, server.output())
        if m:
            return int(m.group(1))
        time.sleep(0.1)
    raise AssertionError(f"{pattern} not in the server's log")


def finished_total(url: str) -> float:
    return metric_sums(httpx.get(url + "/metrics").text)["lmserve_requests_finished_total"]


BODY = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 4, "ignore_eos": True}


@pytest.fixture
def two_api_processes(llama):
    server = start_lmserve("--model", llama, "--served-model-name", "tiny", "--kv-cache-tokens", "4096",
                           "--api-server-count", "2", "--shutdown-timeout", "60")
    yield server
    server.stop()


def test_two_api_processes_share_the_port_and_count_each_request_once(two_api_processes):
    url = two_api_processes.url
    worker = pid_in_log(two_api_processes, r"API process (\d+) started")
    assert worker in descendants(two_api_processes.proc.pid)

    def one(i):   # a new connection each: the kernel spreads them over both processes
        with httpx.Client() as client:
            return client.post(url + "/v1/completions", json=BODY | {"seed": i}, timeout=60)
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, range(24)))
    assert all(a.status_code == 200 and a.json()["usage"]["completion_tokens"] == 4 for a in answers)
    scrapes = [finished_total(url) for _ in range(8)]   # from whichever process each scrape reaches
    assert scrapes == [24.0] * 8


def test_sigterm_drains_every_api_process_and_leaves_no_process(two_api_processes):
    server = two_api_processes
    pids = descendants(server.proc.pid)
    long = BODY | {"max_tokens": 300, "stream": True}
    results = []

    def stream(i):
        with httpx.Client() as client, client.stream("POST", server.url + "/v1/completions", json=long,
                                                     timeout=60) as r:
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        results.append(events)
    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(stream, i) for i in range(6)]
        time.sleep(1.5)
        server.proc.send_signal(signal.SIGTERM)
        for f in futures:
            f.result()
    assert server.proc.wait(timeout=60) == 0
    for events in results:
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert sum(1 for c in chunks if c["choices"][0]["text"] is not None) == 300
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert_all_gone(pids)


def test_sigterm_to_every_process_at_once_still_drains(two_api_processes):
    """As systemd stops a service: SIGTERM to each of its processes at the same moment."""
    server = two_api_processes
    pids = descendants(server.proc.pid)
    body = BODY | {"max_tokens": 300, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        next(line for line in lines if line.startswith("data: "))
        for pid in [server.proc.pid, *pids]:
            os.kill(pid, signal.SIGTERM)
        events = [line[6:] for line in lines if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
    assert server.proc.wait(timeout=60) == 0
    assert_all_gone(pids)


def test_a_killed_engine_core_fails_waiting_requests_and_ends_the_server_non_zero(two_api_processes):
    server = two_api_processes
    core = pid_in_log(server, r"engine core process (\d+) started")
    pids = descendants(server.proc.pid)
    with httpx.stream("POST", server.url + "/v1/completions", json=BODY | {"max_tokens": 500, "stream": True},
                      timeout=60) as r:
        lines = r.iter_lines()
        next(line for line in lines if line.startswith("data: "))
        os.kill(core, signal.SIGKILL)
        killed = time.monotonic()
        events = [line[6:] for line in lines if line.startswith("data: ")]
    assert time.monotonic() - killed < 5
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "engine_dead"
    assert server.proc.wait(timeout=30) != 0
    assert_all_gone(pids)


def test_a_killed_api_process_ends_the_server_non_zero_and_leaves_no_process(two_api_processes):
    server = two_api_processes
    worker = pid_in_log(server, r"API process (\d+) started")
    pids = descendants(server.proc.pid)
    os.kill(worker, signal.SIGKILL)
    assert server.proc.wait(timeout=30) != 0
    assert "exited with code -9: stopping the server" in server.output()
    assert_all_gone(pids)


def test_a_killed_first_api_process_takes_its_engine_core_and_workers_with_it(two_api_processes):
    server = two_api_processes
    pids = descendants(server.proc.pid)
    assert len(pids) >= 2
    server.proc.kill()
    server.proc.wait(timeout=10)
    assert_all_gone(pids)
