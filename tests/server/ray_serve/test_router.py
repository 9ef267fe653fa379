"""PrefixAffinityRouter, WaitingRequestsPolicy and routing_fields on their own (no Ray cluster)."""
import asyncio
import json
from types import SimpleNamespace

import pytest

pytest.importorskip("ray.serve")

from ray.serve._private.common import DeploymentID  # noqa: E402
from ray.serve.request_router import ReplicaID  # noqa: E402

from server.ray_serve.deployments import WaitingRequestsPolicy  # noqa: E402
from server.ray_serve.http_call import HttpCall, routing_fields  # noqa: E402
from server.ray_serve.router import PrefixAffinityRouter, prefix_hashes  # noqa: E402


class Queues(dict):
    def get(self, replica_id):
        return super().get(replica_id.unique_id)


def replica(name: str, loaded=(), resident=()):
    return SimpleNamespace(replica_id=ReplicaID(name, DeploymentID("lmserve-engine", "lmserve")),
                           routing_stats={"loaded_adapters": list(loaded), "resident_adapters": list(resident)})


def router(**queues) -> PrefixAffinityRouter:
    r = PrefixAffinityRouter.__new__(PrefixAffinityRouter)   # Ray builds it with a controller's handles
    r._replica_queue_len_cache = Queues(queues)
    r.initialize_state(block_chars=8)
    return r


def call(prompt: str, model: str | None = None, replica: str | None = None) -> SimpleNamespace:
    return SimpleNamespace(args=[HttpCall("POST", "/v1/completions", b"", [], b"", prompt, model, replica)])


def names(ranks) -> list[list[str]]:
    return [[r.replica_id.unique_id for r in rank] for rank in ranks]


async def route(r: PrefixAffinityRouter, replicas, request) -> list[list[str]]:
    ranks = await r.choose_replicas(replicas, request)
    first = ranks[0][0]
    r.on_request_routed(request, first.replica_id, None)
    return names(ranks)


def test_a_prompt_goes_where_its_longest_prefix_went():
    asyncio.run(_test_a_prompt_goes_where_its_longest_prefix_went())


async def _test_a_prompt_goes_where_its_longest_prefix_went():
    a, b = replica("a"), replica("b")
    r = router(a=0, b=0)
    first = await route(r, [a, b], call("shared prefix of many blocks: group one"))
    again = await route(r, [a, b], call("shared prefix of many blocks: group one, another question"))
    assert again[0] == [first[0][0]]
    # new prefixes spread round-robin over equally loaded replicas
    spread = {(await route(r, [a, b], call(f"{i} unrelated prompt text")))[0][0] for i in range(4)}
    assert spread == {"a", "b"}


def test_a_busy_owner_is_passed_over():
    asyncio.run(_test_a_busy_owner_is_passed_over())


async def _test_a_busy_owner_is_passed_over():
    a, b = replica("a"), replica("b")
    r = router(a=0, b=0)
    owner = (await route(r, [a, b], call("x" * 64)))[0][0]
    r._replica_queue_len_cache[owner] = 9   # max_imbalance 8 over the shortest queue
    other = {"a": "b", "b": "a"}[owner]
    assert (await r.choose_replicas([a, b], call("x" * 64)))[0][0].replica_id.unique_id == other


def test_adapters_prefer_resident_then_loaded_replicas_and_a_named_replica_comes_first():
    asyncio.run(_test_adapters_prefer_resident_then_loaded_replicas_and_a_named_replica_comes_first())


async def _test_adapters_prefer_resident_then_loaded_replicas_and_a_named_replica_comes_first():
    a, b, c = replica("a"), replica("b", loaded=["sql"]), replica("c", loaded=["sql"], resident=["sql"])
    r = router(a=0, b=0, c=1)
    ranks = names(await r.choose_replicas([a, b, c], call("hello", model="sql")))
    assert ranks[0] == ["c"] and ranks[1] == ["b", "c"]
    assert names(await r.choose_replicas([a, b, c], call("hello", model="base", replica="a")))[0] == ["a"]
    assert names(await r.choose_replicas([a, b, c], call("hello", model="base")))[0][0] in {"a", "b"}   # c is busiest


def test_prefix_hashes_cover_whole_blocks_only():
    assert len(prefix_hashes("x" * 20, 8, 100)) == 2 and len(prefix_hashes("x" * 20, 8, 1)) == 1
    assert prefix_hashes("abcdefgh-tail", 8, 10) == prefix_hashes("abcdefgh", 8, 10)


@pytest.mark.parametrize("body, expected", [
    ({"model": "m", "prompt": "hi there"}, ("hi there", "m")),
    ({"prompt": ["first", "second"]}, ("first", None)),
    ({"prompt": [1, 2, 3]}, ("1 2 3", None)),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": [{"type": "text", "text": "b"}]}]},
     ("user:a\nuser:b\n", None)),
    ({"model": 5, "prompt": {"x": 1}}, ("", None)),
])
def test_routing_fields(body, expected):
    assert routing_fields(json.dumps(body).encode()) == expected


def test_routing_fields_of_what_is_not_a_json_object():
    assert routing_fields(b"\xff not json") == ("", None) == routing_fields(b"[1, 2]") == routing_fields(b"")


def test_waiting_requests_policy():
    policy = WaitingRequestsPolicy(requests_per_replica=8)
    ctx = SimpleNamespace(current_num_replicas=2, aggregated_metrics={})
    assert policy(ctx) == (2, {})   # nothing reported yet: no change
    ctx.aggregated_metrics = {"running": {"a": 8.0, "b": 8.0}, "waiting": {"a": 6.0, "b": 5.0}}
    assert policy(ctx)[0] == 4
    ctx.aggregated_metrics = {"running": {"a": 1.0, "b": 0.0}, "waiting": {"a": 0.0, "b": 0.0}}
    assert policy(ctx)[0] == 1
