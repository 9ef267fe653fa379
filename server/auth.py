"""Who may call the server: API keys with a role and a per-key rate limit, and the audit log of what they did.

With no key configured everything is open, as before. With keys (--api-key, --api-keys-file), every call but
the health checks must bring one (`Authorization: Bearer KEY`, the same in gRPC metadata); adapter load and
unload need the admin role. Keys are compared in constant time and never written anywhere: logs and the audit
log name a key by its id, the first 12 hex digits of its SHA-256. The HTTP middleware and the gRPC
interceptor that enforce this live beside their frontends (server/http/access.py, server/grpc_access.py).
"""
import hashlib
import hmac
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROLES = ("user", "admin")


class AccessConfigError(ValueError):
    pass


@dataclass(frozen=True)
class ApiKey:
    secret: str
    role: str = "user"
    requests_per_minute: float | None = None   # None: no limit

    @property
    def id(self) -> str:
        return key_id(self.secret)


def key_id(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()[:12]


def read_keys_file(path: str | Path) -> list[ApiKey]:
    """One key per line: `KEY ROLE [REQUESTS_PER_MINUTE]`; blank lines and lines starting with # are skipped."""
    keys = []
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise AccessConfigError(f"--api-keys-file {path}: {e.strerror}") from None
    for number, line in enumerate(lines, 1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) not in (2, 3) or fields[1] not in ROLES:
            raise AccessConfigError(f"--api-keys-file {path}, line {number}: expected `KEY ROLE [REQUESTS_PER_MINUTE]` "
                                    f"with ROLE one of {', '.join(ROLES)}")
        rpm = None
        if len(fields) == 3:
            try:
                rpm = float(fields[2])
            except ValueError:
                rpm = -1
            if not rpm > 0:
                raise AccessConfigError(f"--api-keys-file {path}, line {number}: the requests-per-minute limit must "
                                        f"be a positive number; got {fields[2]!r}")
        keys.append(ApiKey(fields[0], fields[1], rpm))
    return keys


class TokenBucket:
    """requests_per_minute tokens a minute, holding at most a minute's worth; each request takes one."""

    def __init__(self, requests_per_minute: float):
        self.rate = requests_per_minute / 60.0
        self.capacity = max(1.0, requests_per_minute)
        self.tokens = self.capacity
        self.updated: float | None = None

    def take(self, now: float, count: int = 1) -> float:
        """0 when count requests may go now (and takes their tokens), else the seconds until they may."""
        if self.updated is not None:
            self.tokens = min(self.capacity, self.tokens + max(0.0, now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= count:
            self.tokens -= count
            return 0.0
        return (count - self.tokens) / self.rate


class AuditLog:
    """JSON lines: time, key id, client address, action, outcome (and details); one flushed write per event."""

    def __init__(self, path: str | None):
        self._file = open(path, "a", encoding="utf-8") if path else None
        self._lock = threading.Lock()

    def record(self, action: str, outcome: str, key: str | None, client: str | None, **details):
        if self._file is None:
            return
        event = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "key_id": key, "client": client, "action": action,
                 "outcome": outcome, **details}
        with self._lock:
            self._file.write(json.dumps(event) + "\n")
            self._file.flush()


@dataclass
class Decision:
    """What the access check says about one call: allowed, or the status to answer with and why."""
    key: ApiKey | None
    status: str = "ok"            # ok | unauthenticated | forbidden | rate_limited
    message: str = ""
    retry_after: float = 0.0
    audit: dict | None = None     # the audit entry of a refusal, when check() was told to leave it to the caller


class AccessControl:
    def __init__(self, keys: list[ApiKey], audit: AuditLog | None = None, keys_file: str | None = None):
        """keys: the keys given on the command line; keys_file: more, read now and again by reload()."""
        self.audit = audit or AuditLog(None)
        self._fixed, self.keys_file = keys, keys_file
        self._lock = threading.Lock()
        self.reload()

    def reload(self):
        """Re-read the keys file (SIGHUP): keys no longer in it are revoked at once; kept keys keep their bucket."""
        keys = self._fixed + (read_keys_file(self.keys_file) if self.keys_file else [])
        secrets = [k.secret for k in keys]
        if len(set(secrets)) != len(secrets):
            raise AccessConfigError("an API key is configured twice")
        if any(not k.secret for k in keys):
            raise AccessConfigError("an API key must not be empty")
        with self._lock:
            old = getattr(self, "_buckets", {})
            self._buckets = {k.secret: old.get(k.secret) or TokenBucket(k.requests_per_minute)
                             for k in keys if k.requests_per_minute}
            self.keys = keys

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def _find(self, presented: str) -> ApiKey | None:
        found = None
        for k in self.keys:  # every key is compared, so the time taken does not tell which one matched
            if hmac.compare_digest(k.secret.encode(), presented.encode()):
                found = k
        return found

    def check(self, authorization: str | None, admin_only: bool, action: str, client: str | None,
              defer_audit: bool = False) -> Decision:
        """Decide one call from its Authorization value (`Bearer KEY`), and audit what is refused (or, with
        defer_audit, put the entry in the decision for a caller that learns the client later)."""
        decision = self._decide(authorization, admin_only, action)
        if decision.audit is not None and not defer_audit:
            self.audit.record(**decision.audit, client=client)
        return decision

    def _decide(self, authorization: str | None, admin_only: bool, action: str) -> Decision:
        if not self.enabled:
            return Decision(None)
        scheme, _, presented = (authorization or "").partition(" ")
        key = self._find(presented.strip()) if scheme.lower() == "bearer" and presented.strip() else None
        if key is None:
            audit = dict(action="auth_failure", outcome="denied",
                         key=key_id(presented.strip()) if presented.strip() else None, call=action)
            return Decision(None, "unauthenticated", "a valid API key is required: send `Authorization: Bearer KEY`",
                            audit=audit)
        if admin_only and key.role != "admin":
            return Decision(key, "forbidden", f"{action} needs an admin key; this key's role is {key.role}",
                            audit=dict(action="auth_failure", outcome="forbidden", key=key.id, call=action))
        bucket = self._buckets.get(key.secret)
        if bucket is not None:
            with self._lock:
                wait = bucket.take(time.monotonic())
            if wait > 0:
                return Decision(key, "rate_limited", f"this key's limit of {key.requests_per_minute:g} requests per "
                                                     f"minute is reached; retry in {wait:.1f} s", wait,
                                audit=dict(action="rate_limit", outcome="denied", key=key.id, call=action))
        return Decision(key)

    def charge(self, key: ApiKey, count: int, action: str, client: str | None) -> Decision:
        """count more turns of key's rate limit for one call (completions past its first); all or none."""
        bucket = self._buckets.get(key.secret)
        if bucket is None:
            return Decision(key)
        with self._lock:
            # the call's own first turn was taken already, so a count the bucket never holds beside it never goes
            wait = bucket.take(time.monotonic(), count) if count + 1 <= bucket.capacity else float("inf")
        if wait == 0:
            return Decision(key)
        self.audit.record("rate_limit", "denied", key.id, client, call=action, completions=count + 1)
        limit = f"this key's limit of {key.requests_per_minute:g} requests per minute"
        if wait == float("inf"):
            return Decision(key, "rate_limited", f"this request's {count + 1} completions exceed {limit}", 60.0)
        return Decision(key, "rate_limited", f"{limit} cannot cover this request's {count + 1} completions now; "
                                             f"retry in {wait:.1f} s", wait)


def build_access(api_keys: list[str], api_keys_file: str | None, audit_log: str | None) -> AccessControl:
    """The server's access control from its flags: --api-key values are admin keys without a limit (the operator's)."""
    return AccessControl([ApiKey(k, "admin") for k in api_keys], AuditLog(audit_log), api_keys_file)
