import re

import grpc
import httpx
import pytest

from server.grpc_gen import inference_pb2 as pb
from server.grpc_gen import inference_pb2_grpc as pb_grpc
from tests.server.conftest import MODEL_NAME, LiveServer


@pytest.fixture(scope="package")
def served_metrics(llama) -> set[str]:
    """The metric names on a real server's /metrics (engine core in its own process, as python -m server runs
    it) after a completion, a gRPC call, a refused adapter load and a 404, so that every labelled family has a
    series."""
    with LiveServer(llama, multiprocess=True, kv_cache_tokens=2048) as server:
        assert httpx.post(server.url + "/v1/completions", json={"model": MODEL_NAME, "prompt": "Hi", "max_tokens": 2}
                          ).status_code == 200
        with grpc.insecure_channel(server.grpc_target) as channel:
            pb_grpc.InferenceStub(channel).GenerateUnary(pb.GenerateRequest(text="Hi", sampling=pb.SamplingParameters(
                max_tokens=1)))
        httpx.post(server.url + "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "y"})
        httpx.get(server.url + "/nothing")
        text = httpx.get(server.url + "/metrics").text
    return set(re.findall(r"^(lmserve_[a-z_]+)", text, re.M))
