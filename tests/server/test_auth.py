"""API keys, roles, rate limits and the audit log: the rules, then over HTTP and gRPC against a live server."""
import json
import signal
import time

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.processes import start_lmserve
from server.auth import AccessConfigError, AccessControl, ApiKey, AuditLog, TokenBucket, build_access, key_id
from server.grpc_gen import inference_pb2 as pb
from server.grpc_gen import inference_pb2_grpc as pb_grpc
from tests.server.conftest import MODEL_NAME, LiveServer

USER, ADMIN, LIMITED = "user-key-1", "admin-key-1", "limited-key-1"


def test_keys_file_lines_and_their_errors(tmp_path):
    f = tmp_path / "keys"
    f.write_text(f"# comment\n\n{USER} user\n{ADMIN} admin\n{LIMITED} user 2\n")
    access = build_access(["cli-key"], str(f), None)
    assert [(k.role, k.requests_per_minute) for k in access.keys] == [("admin", None), ("user", None), ("admin", None),
                                                                      ("user", 2.0)]
    for text, fragment in [("k root\n", "line 1"), ("a user\nb user x\n", "line 2: the requests-per-minute"),
                           ("a user\na admin\n", "twice"), ("a user 0\n", "positive")]:
        f.write_text(text)
        with pytest.raises(AccessConfigError, match=fragment):
            build_access([], str(f), None)


def test_token_bucket_allows_a_minutes_worth_then_paces():
    bucket = TokenBucket(120)           # 2 a second, 120 at once
    assert all(bucket.take(0.0) == 0 for _ in range(120))
    assert bucket.take(0.0) == pytest.approx(0.5)
    assert bucket.take(0.5) == 0 and bucket.take(0.5) > 0


def test_check_decides_and_audits_refusals(tmp_path):
    log = tmp_path / "audit.jsonl"
    access = AccessControl([ApiKey(USER), ApiKey(ADMIN, "admin")], AuditLog(str(log)))
    assert access.check(f"Bearer {USER}", False, "x", "1.2.3.4:5").status == "ok"
    assert access.check(f"Bearer {USER}", True, "x", None).status == "forbidden"
    assert access.check(f"Bearer {ADMIN}", True, "x", None).status == "ok"
    for bad in (None, "", "Bearer", f"Basic {USER}", "Bearer nope", f"Bearer {USER}x"):
        assert access.check(bad, False, "x", None).status == "unauthenticated"
    events = [json.loads(line) for line in log.read_text().splitlines()]
    assert [e["outcome"] for e in events] == ["forbidden"] + ["denied"] * 6
    assert events[0]["key_id"] == key_id(USER) and USER not in log.read_text()


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("keys") / "keys"
    f.write_text(f"{USER} user\n{ADMIN} admin\n{LIMITED} user 3\n")
    return f


@pytest.fixture(scope="module")
def guarded(llama, keys_file, tmp_path_factory):
    audit = tmp_path_factory.mktemp("audit") / "audit.jsonl"
    access = build_access([], str(keys_file), str(audit))
    with LiveServer(llama, access=access, kv_cache_tokens=4096, lora_dir=str(tmp_path_factory.mktemp("empty"))) as s:
        s.audit_path = audit
        yield s


def _post(server, path, key=None, body=None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(server.url + path, json=body or {}, headers=headers, timeout=60)


def test_http_needs_a_valid_key_except_for_health(guarded):
    body = {"model": MODEL_NAME, "prompt": "Hi", "max_tokens": 2}
    assert httpx.get(guarded.url + "/health").status_code == 200
    missing, wrong = _post(guarded, "/v1/completions", None, body), _post(guarded, "/v1/completions", "nope", body)
    assert missing.status_code == wrong.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert missing.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(guarded.url + "/metrics").status_code == 401
    assert _post(guarded, "/v1/completions", USER, body).status_code == 200
    assert httpx.get(guarded.url + "/v1/models", headers={"Authorization": f"Bearer {ADMIN}"}).status_code == 200


def test_adapter_routes_need_the_admin_role_and_are_audited(guarded):
    forbidden = _post(guarded, "/v1/unload_lora_adapter", USER, {"lora_name": "x"})
    assert forbidden.status_code == 403 and "admin" in forbidden.json()["error"]["message"]
    assert _post(guarded, "/v1/unload_lora_adapter", ADMIN, {"lora_name": "x"}).status_code == 404  # allowed, unknown
    events = [json.loads(line) for line in guarded.audit_path.read_text().splitlines()]
    assert {"action": "adapter_unload", "outcome": "404", "key_id": key_id(ADMIN)}.items() <= events[-1].items()
    assert any(e["action"] == "auth_failure" and e["outcome"] == "forbidden" for e in events)
    assert events[-1]["client"].startswith("127.0.0.1:")


def test_rate_limit_answers_429_with_retry_after(guarded):
    body = {"model": MODEL_NAME, "prompt": "Hi", "max_tokens": 1}
    statuses = [_post(guarded, "/v1/completions", LIMITED, body) for _ in range(4)]
    assert [r.status_code for r in statuses] == [200, 200, 200, 429]
    assert int(statuses[-1].headers["retry-after"]) >= 1 and "3 requests per minute" in statuses[-1].text
    assert _post(guarded, "/v1/completions", USER, body).status_code == 200   # other keys unaffected
    assert any(json.loads(line)["action"] == "rate_limit" for line in guarded.audit_path.read_text().splitlines())


def test_grpc_needs_a_key_and_the_admin_role_for_adapters(guarded):
    with grpc.insecure_channel(guarded.grpc_target) as channel:
        stub = pb_grpc.InferenceStub(channel)
        request = pb.GenerateRequest(text="Hi", sampling=pb.SamplingParameters(max_tokens=2))
        for call in (lambda: stub.GenerateUnary(request), lambda: list(stub.Generate(request))):
            with pytest.raises(grpc.RpcError) as e:
                call()
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        user = (("authorization", f"Bearer {USER}"),)
        assert len(stub.GenerateUnary(request, metadata=user).token_ids) == 2
        with pytest.raises(grpc.RpcError) as e:
            stub.UnloadLoRAAdapter(pb.UnloadLoRAAdapterRequest(lora_name="x"), metadata=user)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.RpcError) as e:
            stub.UnloadLoRAAdapter(pb.UnloadLoRAAdapterRequest(lora_name="x"),
                                   metadata=(("authorization", f"Bearer {ADMIN}"),))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    events = [json.loads(line) for line in guarded.audit_path.read_text().splitlines()]
    assert {"action": "adapter_unload", "outcome": "NOT_FOUND"}.items() <= events[-1].items()


def test_a_key_removed_from_the_file_is_revoked_on_reload(guarded, keys_file):
    body = {"model": MODEL_NAME, "prompt": "Hi", "max_tokens": 1}
    original = keys_file.read_text()
    try:
        keys_file.write_text(f"{ADMIN} admin\n")
        guarded.access.reload()
        assert _post(guarded, "/v1/completions", USER, body).status_code == 401
        assert _post(guarded, "/v1/completions", ADMIN, body).status_code == 200
    finally:
        keys_file.write_text(original)
        guarded.access.reload()


def test_the_real_process_guards_with_its_keys_file_and_revokes_on_sighup(llama, tmp_path):
    keys, audit = tmp_path / "keys", tmp_path / "audit.jsonl"
    keys.write_text(f"{ADMIN} admin\n{USER} user\n{LIMITED} user 2\n")
    process = start_lmserve("--model", llama, "--served-model-name", "tiny", "--kv-cache-tokens", "2048",
                            "--api-keys-file", str(keys), "--audit-log", str(audit))
    try:
        def post(key, path="/v1/completions"):
            body = {"model": "tiny", "prompt": "Hi", "max_tokens": 1, "lora_name": "x"}
            return httpx.post(process.url + path, json=body, headers={"Authorization": f"Bearer {key}"} if key else {},
                              timeout=60).status_code

        assert httpx.get(process.url + "/health").status_code == 200
        assert (post(None), post("wrong"), post(USER), post(ADMIN)) == (401, 401, 200, 200)
        assert post(USER, "/v1/unload_lora_adapter") == 403
        assert [post(LIMITED) for _ in range(3)] == [200, 200, 429]
        keys.write_text(f"{ADMIN} admin\n")
        process.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while post(USER) != 401:
            assert time.monotonic() < deadline, "the removed key still works after SIGHUP"
            time.sleep(0.1)
        assert post(ADMIN) == 200
    finally:
        log = process.output()
        process.stop()
    assert ADMIN not in log and USER not in log and key_id(USER) in audit.read_text()
    actions = {(e["action"], e["outcome"]) for e in map(json.loads, audit.read_text().splitlines())}
    assert {("auth_failure", "denied"), ("auth_failure", "forbidden"), ("rate_limit", "denied")} <= actions


def test_keys_added_to_an_empty_keys_file_are_enforced_after_reload(llama, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# no keys yet\n")
    access = build_access([], str(keys), None)
    body = {"model": MODEL_NAME, "prompt": "Hi", "max_tokens": 1}
    with LiveServer(llama, access=access, kv_cache_tokens=2048) as server:
        assert _post(server, "/v1/completions", None, body).status_code == 200   # open while there is no key
        keys.write_text(f"{USER} user\n")
        access.reload()
        assert _post(server, "/v1/completions", None, body).status_code == 401
        assert _post(server, "/v1/completions", USER, body).status_code == 200
        with grpc.insecure_channel(server.grpc_target) as channel:
            with pytest.raises(grpc.RpcError) as e:
                pb_grpc.InferenceStub(channel).GenerateUnary(pb.GenerateRequest(text="Hi", sampling=pb.SamplingParameters(
                    max_tokens=1)))
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_open_metrics_serves_metrics_without_a_key_and_nothing_else(llama, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text(f"{USER} user\n")
    with LiveServer(llama, access=build_access([], str(keys), None), open_metrics=True, kv_cache_tokens=2048) as server:
        assert httpx.get(server.url + "/metrics").status_code == 200
        assert httpx.get(server.url + "/v1/models").status_code == 401
        assert _post(server, "/v1/completions", None, {"model": MODEL_NAME, "prompt": "Hi", "max_tokens": 1}
                     ).status_code == 401
