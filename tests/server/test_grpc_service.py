"""gRPC against a live server: streaming and unary generation, errors as status codes (generated requests
included), cancel, health, reflection."""
import asyncio
import shutil

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from server.grpc_gen import inference_pb2 as pb
from server.grpc_gen import inference_pb2_grpc as pb_grpc
from tests.server.conftest import MODEL_NAME, LiveServer, MergedReference


@pytest.fixture(scope="module")
def stub(live):
    channel = grpc.insecure_channel(live.grpc_target)
    yield pb_grpc.InferenceStub(channel)
    channel.close()


def greedy(max_tokens: int, **kw) -> pb.SamplingParameters:
    return pb.SamplingParameters(max_tokens=max_tokens, temperature=0, ignore_eos=True, **kw)


def test_streaming_generate_matches_the_engine_and_hf(live, stub, hf_reference):
    prompt = [5, 17, 42, 99, 7]
    responses = list(stub.Generate(pb.GenerateRequest(model=MODEL_NAME, token_ids=pb.TokenIds(ids=prompt),
                                                      sampling=greedy(10))))
    chunks = [r.chunk for r in responses if r.WhichOneof("response") == "chunk"]
    finals = [r.final for r in responses if r.WhichOneof("response") == "final"]
    assert len(finals) == 1 and responses[-1].WhichOneof("response") == "final"
    tokens = [t for c in chunks for t in c.token_ids]
    assert tokens == hf_reference("llama").greedy(prompt, 10, eos=False)
    assert finals[0].finish_reason == pb.FINISH_REASON_LENGTH
    assert finals[0].usage.prompt_tokens == 5 and finals[0].usage.completion_tokens == 10


def test_unary_generate_with_text_logprobs_and_stop(stub):
    streamed = list(stub.Generate(pb.GenerateRequest(text="Hello", sampling=greedy(12))))
    text = "".join(r.chunk.text for r in streamed if r.WhichOneof("response") == "chunk")
    result = stub.GenerateUnary(pb.GenerateRequest(text="Hello", sampling=greedy(12, logprobs=2)))
    assert result.text == text and len(result.logprobs) == 12
    assert [lp.token_id for lp in result.logprobs] == list(result.token_ids)
    assert all(len(lp.top_logprobs) == 2 for lp in result.logprobs)
    stop = text[4:6]
    stopped = stub.GenerateUnary(pb.GenerateRequest(text="Hello", sampling=greedy(12, stop=[stop])))
    assert stopped.text == text[:text.index(stop)] and stopped.final.finish_reason == pb.FINISH_REASON_STOP
    assert stopped.final.stop_string == stop


@pytest.mark.parametrize("request_,code,fragment", [
    (pb.GenerateRequest(text="hi", sampling=pb.SamplingParameters(max_tokens=100000)), grpc.StatusCode.INVALID_ARGUMENT,
     "max_tokens must be between 1 and"),
    (pb.GenerateRequest(text="hi", sampling=pb.SamplingParameters(top_p=2.0)), grpc.StatusCode.INVALID_ARGUMENT,
     "top_p must be in (0, 1]"),
    (pb.GenerateRequest(sampling=greedy(1)), grpc.StatusCode.INVALID_ARGUMENT, "prompt is required"),
    (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1] * 600)), grpc.StatusCode.INVALID_ARGUMENT,
     "maximum context length is 512"),
    (pb.GenerateRequest(model="other", text="hi"), grpc.StatusCode.NOT_FOUND, "does not exist"),
    (pb.GenerateRequest(adapter="sql", text="hi"), grpc.StatusCode.NOT_FOUND, "adapter 'sql' is not loaded"),
])
def test_errors_are_status_codes(stub, request_, code, fragment):
    for call in (lambda: list(stub.Generate(request_)), lambda: stub.GenerateUnary(request_)):
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == code and fragment in info.value.details()


def test_cancel_and_deadline_abort_the_request(live, stub):
    request_ = pb.GenerateRequest(text="Go on", sampling=greedy(400))
    steps = live.num_steps()
    call = stub.Generate(request_)
    next(call)
    call.cancel()
    assert live.wait_until_all_blocks_free()
    assert live.num_steps() - steps < 300
    steps = live.num_steps()
    with pytest.raises(grpc.RpcError) as info:
        stub.GenerateUnary(request_, timeout=0.1)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert live.wait_until_all_blocks_free()
    assert live.num_steps() - steps < 300


def test_tokenize_and_list_models(live, stub):
    tokens = stub.Tokenize(pb.TokenizeRequest(text="Hello world", add_special_tokens=True))
    assert list(tokens.token_ids) == live.engine.tokenizer.encode("Hello world") and tokens.max_model_len == 512
    models = stub.ListModels(pb.ListModelsRequest())
    assert [m.id for m in models.models] == [MODEL_NAME]


def test_health_and_reflection(live):
    with grpc.insecure_channel(live.grpc_target) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="lmserve.v1.Inference"))
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        responses = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for r in responses for s in r.list_services_response.service}
        assert {"lmserve.v1.Inference", "grpc.health.v1.Health"} <= names


def test_async_streaming_clients_concurrently(live):
    async def main():
        async with grpc.aio.insecure_channel(live.grpc_target) as channel:
            stub = pb_grpc.InferenceStub(channel)

            async def one(i):
                tokens = []
                async for r in stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[10 + i, 11]),
                                                                sampling=greedy(6))):
                    tokens += r.chunk.token_ids
                return tokens
            return await asyncio.gather(*(one(i) for i in range(20)))
    results = asyncio.run(main())
    assert all(len(t) == 6 for t in results)
    assert live.wait_until_all_blocks_free()


@pytest.fixture(scope="module")
def lora_stub(llama, peft_adapters, tmp_path_factory):
    root = tmp_path_factory.mktemp("grpc_loras")
    shutil.copytree(peft_adapters["alpha"], root / "alpha")
    shutil.copytree(peft_adapters["beta"], root / "later" / "beta")
    with LiveServer(llama, kv_cache_tokens=4096, lora_dir=str(root)) as server:
        channel = grpc.insecure_channel(server.grpc_target)
        yield pb_grpc.InferenceStub(channel)
        channel.close()


def test_adapters_are_listed_served_loaded_and_unloaded_over_grpc(llama, peft_adapters, lora_stub):
    models = {m.id: m.parent for m in lora_stub.ListModels(pb.ListModelsRequest()).models}
    assert models == {MODEL_NAME: "", "alpha": MODEL_NAME}
    prompt = [5, 17, 42, 99, 7, 3]
    alpha = MergedReference(llama, peft_adapters["alpha"]).greedy(prompt, 6)
    for request_ in (pb.GenerateRequest(adapter="alpha", token_ids=pb.TokenIds(ids=prompt)),
                     pb.GenerateRequest(model="alpha", token_ids=pb.TokenIds(ids=prompt)),
                     pb.GenerateRequest(model=MODEL_NAME, adapter="alpha", token_ids=pb.TokenIds(ids=prompt))):
        request_.sampling.CopyFrom(pb.SamplingParameters(max_tokens=6, temperature=0))
        assert list(lora_stub.GenerateUnary(request_).token_ids) == alpha

    for bad, fragment in ((pb.LoadLoRAAdapterRequest(lora_name="b", lora_path="../x"), "outside --lora-dir"),
                          (pb.LoadLoRAAdapterRequest(lora_name="alpha", lora_path="later/beta"), "is taken"),
                          (pb.LoadLoRAAdapterRequest(lora_name="b", lora_path="missing"), "not found")):
        with pytest.raises(grpc.RpcError) as info:
            lora_stub.LoadLoRAAdapter(bad)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and fragment in info.value.details()
    loaded = lora_stub.LoadLoRAAdapter(pb.LoadLoRAAdapterRequest(lora_name="beta", lora_path="later/beta"))
    assert loaded.lora_name == "beta" and loaded.rank == 4
    beta = pb.GenerateRequest(adapter="beta", token_ids=pb.TokenIds(ids=prompt),
                              sampling=pb.SamplingParameters(max_tokens=6, temperature=0))
    assert list(lora_stub.GenerateUnary(beta).token_ids) == \
        MergedReference(llama, peft_adapters["beta"]).greedy(prompt, 6)
    lora_stub.UnloadLoRAAdapter(pb.UnloadLoRAAdapterRequest(lora_name="beta"))
    for call in (lambda: lora_stub.GenerateUnary(beta),
                 lambda: lora_stub.UnloadLoRAAdapter(pb.UnloadLoRAAdapterRequest(lora_name="beta"))):
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
FIELDS = dict(
    max_tokens=st.integers(0, 2**32 - 1) | st.integers(0, 8), temperature=floats, top_p=floats,
    top_k=st.integers(-2**31, 2**31 - 1), min_p=floats, repetition_penalty=floats, presence_penalty=floats,
    frequency_penalty=floats, seed=st.integers(-2**63, 2**63 - 1), stop=st.lists(st.text(max_size=300), max_size=20),
    stop_token_ids=st.lists(st.integers(0, 2**32 - 1), max_size=70),
    min_tokens=st.integers(0, 2**32 - 1) | st.integers(0, 4), ignore_eos=st.booleans(),
    logprobs=st.integers(0, 2**32 - 1) | st.integers(0, 25),
    logit_bias=st.dictionaries(st.integers(0, 2**32 - 1), floats, max_size=5),
    include_stop_str_in_output=st.booleans(), max_tokens_to_context=st.booleans())
# every field generated at once (mostly refused), or a valid request with one field generated
sampling = st.builds(pb.SamplingParameters, **FIELDS) | st.one_of(*(
    st.builds(lambda value, name=name: pb.SamplingParameters(**{"max_tokens": 4, "temperature": 0, name: value}),
              values) for name, values in FIELDS.items()))
prompts = st.one_of(
    st.just({}), st.builds(lambda text: {"text": text}, st.text(max_size=40)),
    st.builds(lambda ids: {"token_ids": pb.TokenIds(ids=ids)}, st.lists(st.integers(0, 2**32 - 1), max_size=8)),
    st.builds(lambda ids: {"token_ids": pb.TokenIds(ids=ids)}, st.lists(st.integers(0, 500), max_size=600)))
requests = st.builds(lambda prompt, **fields: pb.GenerateRequest(**prompt, **fields), prompts,
                     model=st.sampled_from(["", MODEL_NAME, MODEL_NAME, "", "", "nope"]), sampling=sampling,
                     adapter=st.sampled_from(["", "", "", "", "", "nope"]), request_id=st.text(max_size=10))

@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                    HealthCheck.too_slow])
@given(request=requests, streaming=st.booleans())
def test_generated_requests_are_answered_or_refused_never_an_internal_error(stub, request, streaming):
    try:
        if streaming:
            list(stub.Generate(request, timeout=60))
        else:
            stub.GenerateUnary(request, timeout=60)
    except grpc.RpcError as e:
        assert e.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), (e.code(), e.details())
        assert e.details()


def test_calls_are_counted_by_method_and_code(live, stub):
    from prometheus_client.parser import text_string_to_metric_families
    import httpx

    def counts() -> dict[tuple[str, str], float]:
        text = httpx.get(live.url + "/metrics").text
        found: dict[tuple[str, str], float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == "lmserve_grpc_responses_total":
                    key = (s.labels["method"], s.labels["code"])
                    found[key] = found.get(key, 0.0) + s.value
        return found
    before = counts()
    stub.GenerateUnary(pb.GenerateRequest(text="Hi", sampling=greedy(2)))
    list(stub.Generate(pb.GenerateRequest(text="Hi", sampling=greedy(2))))
    with pytest.raises(grpc.RpcError):
        list(stub.Generate(pb.GenerateRequest(model="other", text="hi")))
    after = counts()

    def moved(method, code):
        key = (f"/lmserve.v1.Inference/{method}", code)
        return after.get(key, 0.0) - before.get(key, 0.0)
    assert moved("GenerateUnary", "OK") == 1 and moved("Generate", "OK") == 1 and moved("Generate", "NOT_FOUND") == 1
