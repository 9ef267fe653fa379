"""DecodeGraphs: the decode forward pass captured as CUDA graphs for a ladder of batch sizes.

A decode step launches about fifteen kernels per layer from Python; replaying a graph launches them all
at once. A graph replays fixed kernels on fixed memory, so each captured batch size reads its inputs from
static buffers that run() fills: a batch of B decodes runs the smallest captured size >= B, its extra rows
padded (slot -1, which the KV write skips; the padding block's table; position 0) and their output dropped.
Block tables are captured at their widest (MAX_CAPTURED_CONTEXT tokens, like vLLM's max_seq_len_to_capture); the
attention kernel walks each row only up to its own position. Prefill, LoRA batches, batches past the largest size
and contexts past that width run eagerly.
"""
import functools
import logging
import time

import torch

from server.layers.attention import AttentionGroup, AttentionMetadata

log = logging.getLogger("lmserve.engine")

MAX_CAPTURED_BATCH = 512
MAX_CAPTURED_CONTEXT = 8192   # tokens; the decode attention splits its context as if every row were this long
# Graph and eager run the same kernels; only split-K's atomic adds may sum in another order.
GRAPH_TOLERANCE = 1e-2


def graph_batch_sizes(max_batch_size: int) -> list[int]:
    """1, 2, 4, 8, then every 16 up to the first size that holds max_batch_size (at most 512)."""
    top = min(max_batch_size, MAX_CAPTURED_BATCH)
    ladder = [1, 2, 4, 8] + list(range(16, MAX_CAPTURED_BATCH + 1, 16))
    return [s for s in ladder if s < top] + [next(s for s in ladder if s >= top)]


def capture_graph(forward, pool):
    """Records forward()'s kernels into a CUDA graph sharing the memory pool `pool` (None: a new one)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        forward()
    return graph


class DecodeGraphs:
    def __init__(self, model, kv_caches: list[torch.Tensor], max_batch_size: int, max_model_len: int, block_size: int,
                 pad_block: int):
        device = kv_caches[0].device
        self.model, self.kv_caches, self.pad_block = model, kv_caches, pad_block
        self.sizes = graph_batch_sizes(max_batch_size)
        top = self.sizes[-1]
        max_blocks = -(-min(max_model_len, MAX_CAPTURED_CONTEXT) // block_size)
        long = dict(dtype=torch.long, device=device)
        self.input_ids = torch.zeros(top, **long)
        self.positions = torch.zeros(top, **long)
        self.slot_mapping = torch.full((top,), -1, **long)
        self.block_tables = torch.full((top, max_blocks), pad_block, **long)
        self.hidden = torch.zeros(top, model.config.hidden_size, dtype=kv_caches[0].dtype, device=device)
        self.graphs: dict[int, object] = {}

    @property
    def max_blocks(self) -> int:
        return self.block_tables.shape[1]

    def _forward(self, bs: int):
        # The metadata is built from views of the static buffers, so a replay reads whatever run() put there.
        rows = slice(0, bs)
        meta = AttentionMetadata(self.slot_mapping[rows], [
            AttentionGroup(rows, self.block_tables[rows], self.positions[rows].view(bs, 1))])
        hidden = self.model(self.input_ids[rows], self.positions[rows], self.kv_caches, meta)
        self.hidden[rows].copy_(hidden)

    @torch.inference_mode()
    def capture(self):
        """Largest size first, so the smaller graphs reuse its memory. Each size runs once eagerly before its
        capture: that compiles and autotunes its kernels, which must not happen inside a capture."""
        pool = None
        for bs in reversed(self.sizes):
            self._forward(bs)
            self._synchronize()
            graph = capture_graph(functools.partial(self._forward, bs), pool)
            pool = graph.pool()
            self.graphs[bs] = graph
        self._synchronize()

    def _synchronize(self):
        if self.hidden.is_cuda:
            torch.cuda.synchronize()

    def serves(self, batch) -> bool:
        """A batch of decodes only (one group of single queries), base model only, that a graph holds."""
        groups = batch.meta.groups
        return (bool(self.graphs) and len(groups) == 1 and groups[0].shape[1] == 1 and batch.lora_slots is None
                and groups[0].shape[0] <= self.sizes[-1] and groups[0].block_tables.shape[1] <= self.max_blocks)

    def run(self, batch) -> torch.Tensor:
        """The hidden states [B, D] of a batch serves() accepted; valid until the next run()."""
        group = batch.meta.groups[0]
        n, width = group.shape[0], group.block_tables.shape[1]
        bs = next(s for s in self.sizes if s >= n)
        self.input_ids[:n].copy_(batch.input_ids)
        self.positions[:n].copy_(batch.positions)
        self.positions[n:bs].zero_()
        self.slot_mapping[:n].copy_(batch.meta.slot_mapping)
        self.slot_mapping[n:bs].fill_(-1)
        self.block_tables[:bs].fill_(self.pad_block)
        self.block_tables[:n, :width].copy_(group.block_tables)
        self.graphs[bs].replay()
        return self.hidden[:n]

    @torch.inference_mode()
    def check_against_eager(self, sizes: list[int]) -> float:
        """Replays each size on inputs unlike the capture's and compares with the eager forward on them;
        returns the largest difference relative to the output's scale. Nothing is written to the cache."""
        worst = 0.0
        vocab = self.model.config.vocab_size
        for bs in sizes:
            self.input_ids[:bs].copy_(torch.arange(1, bs + 1) * 7919 % vocab)
            # positions below max_blocks are below max_model_len; every key they see is in the padding block
            self.positions[:bs].copy_(torch.arange(bs) * 13 % self.max_blocks)
            self.slot_mapping[:bs].fill_(-1)
            self.block_tables[:bs].fill_(self.pad_block)
            self._forward(bs)
            eager = self.hidden[:bs].clone()
            self.hidden[:bs].zero_()
            self.graphs[bs].replay()
            scale = eager.abs().max().clamp_min(1e-6)
            worst = max(worst, ((self.hidden[:bs] - eager).abs().max() / scale).item())
        return worst


def build_decode_graphs(model, kv_caches: list[torch.Tensor], max_batch_size: int, max_model_len: int,
                        block_size: int, pad_block: int) -> DecodeGraphs | None:
    """Captures the ladder and checks the smallest and largest graph against the eager forward; None (decode
    runs eagerly) when capture fails or a graph computes something else, which is logged as an error."""
    start = time.perf_counter()
    graphs = DecodeGraphs(model, kv_caches, max_batch_size, max_model_len, block_size, pad_block)
    try:
        graphs.capture()
        error = graphs.check_against_eager([graphs.sizes[0], graphs.sizes[-1]])
    except Exception:
        log.exception("capturing the decode CUDA graphs failed; decoding eagerly")
        return None
    if not error <= GRAPH_TOLERANCE:
        log.error("a decode CUDA graph differs from the eager forward by %.2e of the output's scale; "
                  "decoding eagerly", error)
        return None
    log.info("decode CUDA graphs for batch sizes %d..%d (%d graphs) captured in %.1f s; graph vs eager %.1e",
             graphs.sizes[0], graphs.sizes[-1], len(graphs.sizes), time.perf_counter() - start, error)
    return graphs
