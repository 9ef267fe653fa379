"""DecodeGraphs on the CPU: the static buffers, padding and routing around the graphs, with each "graph"
replaying by running the captured forward again on the same buffers (CUDA graphs need a GPU; on one,
build_decode_graphs also checks the smallest and largest graph against the eager forward at start)."""
import asyncio

import pytest
import torch

from server import cuda_graphs
from server.cuda_graphs import DecodeGraphs, graph_batch_sizes
from server.layers.attention import AttentionGroup, AttentionMetadata
from server.model_runner import PreparedBatch
from server.sampling import SamplingParams
from tests.conftest import collect, random_prompts, run
from tests.server.test_engine import assert_all_blocks_free, make_engine


class ReplayByRerun:
    """Stands in for torch.cuda.CUDAGraph: replay() reruns the forward, which reads the static buffers."""

    def __init__(self, forward):
        self.forward, self.replays = forward, 0
        forward()

    def replay(self):
        self.replays += 1
        self.forward()

    def pool(self):
        return None


@pytest.fixture
def rerun_graphs(monkeypatch):
    monkeypatch.setattr(cuda_graphs, "capture_graph", lambda forward, pool: ReplayByRerun(forward))


def test_batch_sizes_cover_the_largest_batch():
    assert graph_batch_sizes(1) == [1]
    assert graph_batch_sizes(5) == [1, 2, 4, 8]
    assert graph_batch_sizes(64) == [1, 2, 4, 8, 16, 32, 48, 64]
    assert graph_batch_sizes(70) == [1, 2, 4, 8, 16, 32, 48, 64, 80]
    assert graph_batch_sizes(10_000)[-1] == 512


def capture(engine, max_batch_size: int) -> DecodeGraphs:
    runner = engine.core.runner
    graphs = DecodeGraphs(engine.core.model, runner.kv_caches, max_batch_size, engine.max_model_len, runner.block_size,
                          runner.pad_block)
    graphs.capture()
    runner.decode_graphs = graphs
    return graphs


def test_decodes_through_graphs_match_hf_and_write_no_padding(llama, hf_reference, rerun_graphs):
    # Graphs for 1, 2 and 4 rows. Six sequences of different lengths arrive at once: their first decodes (six
    # rows) run eagerly; as they finish, 4 and then 2 and 1 remain (3 rides the 4-row graph with one padding row).
    engine = make_engine(llama, kv_cache_tokens=2048, enforce_eager=True)
    graphs = capture(engine, 4)
    assert graphs.sizes == [1, 2, 4]
    prompts = random_prompts(6, [3, 9, 17, 33], seed=11)
    lengths = [4, 7, 10, 14, 19, 24]

    async def main():
        return await asyncio.gather(*(
            collect(engine, p, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
            for p, n in zip(prompts, lengths)))
    results = run(main())
    ref = hf_reference("llama")
    for prompt, n, (tokens, _, _) in zip(prompts, lengths, results):
        assert tokens == ref.greedy(prompt, n, eos=False)
    assert all(graphs.graphs[bs].replays > 0 for bs in graphs.sizes)
    pad = engine.core.runner.pad_block
    assert all(cache[:, pad].eq(0).all() for cache in engine.core.runner.kv_caches), "padding rows wrote the cache"
    assert_all_blocks_free(engine)


def batch_of(queries_per_row: list[int], width: int = 2, lora: bool = False) -> PreparedBatch:
    groups, offset = [], 0
    for n in sorted(set(queries_per_row)):
        rows = queries_per_row.count(n)
        positions = torch.arange(n).repeat(rows, 1)
        groups.append(AttentionGroup(slice(offset, offset + rows * n), torch.zeros(rows, width, dtype=torch.long),
                                     positions))
        offset += rows * n
    ids = torch.zeros(offset, dtype=torch.long)
    return PreparedBatch(ids, ids, AttentionMetadata(ids, groups), ids, [], [], [],
                         torch.zeros(offset, dtype=torch.long) if lora else None)


def test_only_base_model_decodes_that_fit_a_graph_replay_one(llama, rerun_graphs):
    engine = make_engine(llama, kv_cache_tokens=2048, enforce_eager=True)
    graphs = capture(engine, 2)
    assert graphs.serves(batch_of([1])) and graphs.serves(batch_of([1, 1]))
    assert not graphs.serves(batch_of([1, 1, 1])), "more rows than the largest graph"
    assert not graphs.serves(batch_of([5])), "a prompt chunk"
    assert not graphs.serves(batch_of([1, 5])), "decodes beside a prompt chunk"
    assert not graphs.serves(batch_of([1], lora=True)), "an adapter's rows"
    assert not graphs.serves(batch_of([1], width=graphs.max_blocks + 1)), "a context past the captured tables"
    assert graphs.serves(batch_of([1], width=graphs.max_blocks))


def test_a_padded_replay_equals_the_eager_forward_and_writes_only_its_rows(llama, rerun_graphs):
    # Three decodes replay the 4-row graph over a cache of random keys and values.
    engine = make_engine(llama, kv_cache_tokens=2048, enforce_eager=True)
    graphs = capture(engine, 4)
    caches = engine.core.runner.kv_caches
    pad = engine.core.runner.pad_block
    for cache in caches:
        cache[:, :pad].normal_()
    before = [cache.clone() for cache in caches]
    device = engine.core.device
    tables = torch.tensor([[3, 4, 5], [7, 8, pad], [10, pad, pad]], device=device)
    positions = torch.tensor([[40], [17], [9]], device=device)
    slots = tables[torch.arange(3, device=device), positions[:, 0] // 16] * 16 + positions[:, 0] % 16
    ids = torch.tensor([11, 12, 13], device=device)
    meta = AttentionMetadata(slots, [AttentionGroup(slice(0, 3), tables, positions)])
    batch = PreparedBatch(ids, positions.view(-1), meta, torch.arange(3, device=device), [], [], [], None)
    assert graphs.serves(batch)
    with torch.inference_mode():
        hidden = graphs.run(batch).clone()
        written = [cache.clone() for cache in caches]
        eager_caches = [cache.clone() for cache in before]
        eager = engine.core.model(ids, positions.view(-1), eager_caches, batch.meta)
    torch.testing.assert_close(hidden, eager)
    for old, new, eager_cache in zip(before, written, eager_caches):
        changed = (old != new).flatten(start_dim=3).any(-1).flatten(1, 2).any(0).nonzero().view(-1)
        assert changed.tolist() == sorted(slots.tolist())
        torch.testing.assert_close(new, eager_cache)   # 4 rows vs 3 through the matmuls: rounding only


class ReplayNothing(ReplayByRerun):
    """A graph whose replay leaves its output as the capture left it, like one that baked in its inputs."""

    def replay(self):
        pass


def test_a_graph_that_differs_from_eager_is_dropped_at_start(llama, rerun_graphs, monkeypatch, caplog):
    engine = make_engine(llama, kv_cache_tokens=2048, enforce_eager=True)
    runner = engine.core.runner
    args = (engine.core.model, runner.kv_caches, 4, engine.max_model_len, runner.block_size, runner.pad_block)
    assert cuda_graphs.build_decode_graphs(*args).sizes == [1, 2, 4]
    monkeypatch.setattr(cuda_graphs, "capture_graph", lambda forward, pool: ReplayNothing(forward))
    with caplog.at_level("ERROR", logger="lmserve.engine"):
        assert cuda_graphs.build_decode_graphs(*args) is None
    assert "differs from the eager forward" in caplog.text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="real CUDA graphs need a GPU")
def test_on_a_gpu_graph_decoding_equals_eager_decoding(llama):
    prompts = random_prompts(5, [3, 9, 17, 33], seed=12)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)

    def decode(**kw):
        engine = make_engine(llama, kv_cache_tokens=2048, device="cuda", max_batch_size=8, **kw)

        async def main():
            return await asyncio.gather(*(collect(engine, p, params) for p in prompts))
        return engine, [tokens for tokens, _, _ in run(main())]
    graphed, with_graphs = decode()
    assert graphed.core.runner.decode_graphs is not None, "capture failed or differed from eager: see the log"
    assert with_graphs == decode(enforce_eager=True)[1]
