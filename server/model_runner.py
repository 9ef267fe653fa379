"""ModelRunner: turns a scheduled batch into tensors, runs the model over the paged KV cache, samples.

prepare() runs on the event loop (it reads sequences the loop owns); run() touches only the prepared
tensors, so it can run in a worker thread while the loop keeps serving.
"""
import itertools
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import torch

from batching.scheduler import SchedulerOutput
from server.compiled_decode import CompiledDecode
from server.cuda_graphs import DecodeGraphs
from server.errors import RequestFailedError
from server.layers.attention import AttentionGroup, AttentionMetadata
from server.sampling import InvalidRequestError, SampledToken, SamplerRow, sample, token_logprobs
from server.grammar_masks import fill_bitmasks
from server.tp_workers import StepMessage, TensorParallelWorkers, to_device
from batching.kv_cache import zero_blocks
from batching.sequence import Sequence

log = logging.getLogger("lmserve.engine")


@dataclass
class PreparedBatch:
    input_ids: torch.Tensor          # [T]
    positions: torch.Tensor          # [T]
    meta: AttentionMetadata
    sample_indices: torch.Tensor     # [B'] rows of the flat batch whose logits are sampled
    sample_seqs: list[Sequence]
    sampler_rows: list[SamplerRow]
    prompt_scoring: list[tuple[Sequence, torch.Tensor, torch.Tensor]]  # (seq, batch rows, next prompt tokens)
    lora_slots: torch.Tensor | None  # [T] each token's adapter pool slot, -1 for the base model; None: base only
    step_message: StepMessage | None = None   # tensor parallelism: what the other ranks run (host tensors)


@dataclass
class StepResult:
    sampled: dict[Sequence, SampledToken]
    prompt_logprobs: dict[Sequence, list[SampledToken]]
    failed: dict[Sequence, Exception]   # rows that could not be sampled: the error each request ends with; the
                                        # rest of the batch goes on


class ModelRunner:
    def __init__(self, model, kv_caches: list[torch.Tensor], block_size: int, device: torch.device,
                 eos_token_ids: tuple[int, ...], lora_pool=None, tp_workers: TensorParallelWorkers | None = None):
        self.model = model
        self.lora_pool = lora_pool
        self.tp_workers = tp_workers     # tensor parallelism: each step is sent to the other ranks first
        self._blocks_to_clear: list[int] = []   # on the other ranks, with the next step
        if tp_workers is not None and lora_pool is not None:
            lora_pool.pending = []
        self.kv_caches = kv_caches       # per layer: [2, num_blocks, block_size, Hkv, Dh]
        # Block tables are padded with the cache's last block, which the engine never hands out (all zeros).
        self.pad_block = kv_caches[0].shape[1] - 1
        self.block_size = block_size
        self.device = device
        self.eos_token_ids = eos_token_ids
        self.decode_graphs: DecodeGraphs | None = None   # set by the engine on CUDA unless --enforce-eager
        self.compiled_decode: CompiledDecode | None = None   # set by the engine on CPU with --compile
        self._mask_filler = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmserve-masks")

    def shutdown(self):
        self._mask_filler.shutdown(wait=True)

    def clear_blocks(self, blocks: list[int]):
        """Zeroes KV blocks (a failed row's NaN must not reach their next owner), on every rank: the others
        with the next step (called on the loop's thread, between steps)."""
        zero_blocks(self.kv_caches, blocks)
        if self.tp_workers is not None:
            self._blocks_to_clear += blocks

    def prepare(self, out: SchedulerOutput) -> PreparedBatch:
        bs = self.block_size
        # Sequences advancing by the same number of tokens form one attention group of B rows x n queries:
        # all decodes (n = 1) are one group, and so are prompt chunks of equal length.
        items = sorted(out.scheduled, key=lambda s: s.num_new_tokens)
        input_ids, positions, slots, sample_idx, sample_seqs, groups, scoring = [], [], [], [], [], [], []
        lora_slots: list[int] = []
        for item in items:
            seq, start, n = item.seq, item.seq.num_computed_tokens, item.num_new_tokens
            if seq.params.prompt_logprobs is not None:
                # Position p's logits score prompt token p + 1; positions already scored (before a preemption) are not redone.
                first, end = max(start, len(seq.prompt_logprobs)), min(start + n, seq.num_prompt_tokens - 1)
                if first < end:
                    rows = range(len(input_ids) + first - start, len(input_ids) + end - start)
                    scoring.append((seq, self._host(list(rows)), self._host(seq.token_ids[first + 1:end + 1])))
            lora_slots += [self.lora_pool.slot_of(seq.lora) if seq.lora is not None else -1] * n
            input_ids += seq.token_ids[start:start + n]
            positions += range(start, start + n)
            table = seq.block_table
            slots += [table[p // bs] * bs + p % bs for p in range(start, start + n)]
            if item.samples:
                sample_idx.append(len(input_ids) - 1)
                sample_seqs.append(seq)
        offset = 0
        for n, run in itertools.groupby(items, key=lambda s: s.num_new_tokens):
            run = list(run)
            queries = [list(range(s.seq.num_computed_tokens, s.seq.num_computed_tokens + n)) for s in run]
            groups.append(self._group(slice(offset, offset + n * len(run)), [s.seq for s in run], queries))
            offset += n * len(run)
        # The loop appends to token_ids only after run() returns, so the worker may read them in place.
        rows = [SamplerRow(s.params, s.generator, s.token_ids, s.num_prompt_tokens, self.eos_token_ids,
                           s.grammar if s.grammar_armed else None) for s in sample_seqs]
        host = PreparedBatch(
            input_ids=self._host(input_ids), positions=self._host(positions),
            meta=AttentionMetadata(self._host(slots), groups),
            sample_indices=self._host(sample_idx), sample_seqs=sample_seqs, sampler_rows=rows, prompt_scoring=scoring,
            lora_slots=self._host(lora_slots) if any(s >= 0 for s in lora_slots) else None)
        if self.tp_workers is not None:
            host.step_message = self._step_message(host)
        return host if self.device.type == "cpu" else _on_device(host, self.device)

    def _step_message(self, host: PreparedBatch) -> StepMessage:
        """What the other tensor-parallel ranks need to run this step's forward and logits with rank 0, with the
        adapter installs and KV blocks to zero made since the last step (on this, the loop's, thread)."""
        logits_rows = ([host.sample_indices] if host.sample_seqs else []) + [rows for _, rows, _ in host.prompt_scoring]
        installs = []
        if self.lora_pool is not None:
            installs, self.lora_pool.pending = self.lora_pool.pending, []
        clears, self._blocks_to_clear = self._blocks_to_clear, []
        return StepMessage(host.input_ids, host.positions, host.meta, host.lora_slots, logits_rows, installs, clears)

    def _group(self, tokens: slice, seqs: list[Sequence], query_positions: list[list[int]]) -> AttentionGroup:
        # Each row's blocks up to its last query, padded with the padding block (masked) to the group's longest.
        num_blocks = -(-(max(q[-1] for q in query_positions) + 1) // self.block_size)
        tables = [s.block_table[:num_blocks] + [self.pad_block] * (num_blocks - len(s.block_table[:num_blocks]))
                  for s in seqs]
        return AttentionGroup(tokens, self._host(tables), self._host(query_positions))

    def _host(self, data) -> torch.Tensor:
        """data as a host tensor: pinned when the device is CUDA, so its copy there does not wait."""
        t = torch.tensor(data, dtype=torch.long)
        return t.pin_memory() if self.device.type == "cuda" else t

    @torch.inference_mode()
    def run(self, batch: PreparedBatch) -> StepResult:
        lora = None
        if batch.lora_slots is not None:
            lora = self.lora_pool
            lora.token_slots = batch.lora_slots   # read by every projection of this forward, in this thread only
        grammars = [row.grammar for row in batch.sampler_rows if row.grammar is not None]
        # The grammars' masks are filled on a thread of their own while the forward pass runs.
        masks = self._mask_filler.submit(fill_bitmasks, grammars, self.model.config.vocab_size) if grammars else None
        if batch.step_message is not None:
            self.tp_workers.send(batch.step_message)
        logits = self._run_compiled(batch)   # the compiled step's logits, or None: the forward runs here
        if logits is None and self.decode_graphs is not None and self.decode_graphs.serves(batch):
            hidden = self.decode_graphs.run(batch)
        elif logits is None:
            hidden = self.model(batch.input_ids, batch.positions, self.kv_caches, batch.meta, lora)
        sampled, failed = {}, {}
        if batch.sample_seqs:
            if logits is None:
                logits = self.model.compute_logits(hidden[batch.sample_indices])
            sampled, failed = sample_isolating_failures(logits, batch.sample_seqs, batch.sampler_rows,
                                                        masks.result() if masks else None)
            advance_grammars(sampled, failed)
        prompt_logprobs = {
            seq: token_logprobs(self.model.compute_logits(hidden[rows]), targets,
                                [seq.params.prompt_logprobs] * len(targets))
            for seq, rows, targets in batch.prompt_scoring}
        return StepResult(sampled, prompt_logprobs, failed)

    def _run_compiled(self, batch: PreparedBatch) -> torch.Tensor | None:
        """The compiled step's logits for a batch it serves; None otherwise. If it fails (a recompile that
        cannot compile, say), it is dropped and this and later steps run eagerly: the eager forward rewrites the
        same K/V into the same slots."""
        if self.compiled_decode is None or not self.compiled_decode.serves(batch):
            return None
        try:
            return self.compiled_decode.run(batch)
        except Exception:
            log.exception("the compiled decode step failed; decoding eagerly from now on")
            self.compiled_decode = None
            return None


def _on_device(host: PreparedBatch, device: torch.device) -> PreparedBatch:
    """The batch with its tensors copied to the device (from pinned memory: the copies do not wait)."""
    return replace(host, input_ids=to_device(host.input_ids, device), positions=to_device(host.positions, device),
                   meta=to_device(host.meta, device), sample_indices=to_device(host.sample_indices, device),
                   lora_slots=to_device(host.lora_slots, device),
                   prompt_scoring=[(seq, to_device(rows, device), to_device(targets, device))
                                   for seq, rows, targets in host.prompt_scoring])


def sample_isolating_failures(logits: torch.Tensor, seqs: list[Sequence], rows: list[SamplerRow],
                              grammar_bitmask: torch.Tensor | None = None
                              ) -> tuple[dict[Sequence, SampledToken], dict[Sequence, Exception]]:
    """Sample every row at once; a row whose logits are not finite, or whose sampling raises, fails alone."""
    # a NaN makes its row's max NaN, an infinity its max or min infinite: two reductions, no [B, V] temporaries
    finite = torch.isfinite(logits.amax(dim=-1)) & torch.isfinite(logits.amin(dim=-1))
    try:
        sampled = dict(zip(seqs, sample(logits, rows, grammar_bitmask)))
    except Exception:  # find the row(s) that raise, one at a time
        sampled, failed = {}, {}
        constrained = -1
        for i, (seq, row) in enumerate(zip(seqs, rows)):
            constrained += row.grammar is not None
            mask = grammar_bitmask[constrained:constrained + 1] if row.grammar is not None and grammar_bitmask is not None else None
            try:
                sampled[seq] = sample(logits[i:i + 1], [row], mask)[0]
            except Exception as e:
                failed[seq] = _failed(seq, f"sampling failed: {type(e).__name__}: {e}")
    else:
        failed = {}
    for seq, ok in zip(seqs, finite.tolist()):   # the device is in sync already: sample read its tokens
        if not ok:
            sampled.pop(seq, None)
            failed[seq] = _failed(seq, "the model's logits are NaN or infinite")
    return sampled, failed


def _failed(seq: Sequence, reason: str) -> RequestFailedError:
    return RequestFailedError(f"request {seq.request_id} failed: {reason}")


def advance_grammars(sampled: dict[Sequence, SampledToken], failed: dict[Sequence, Exception]):
    """Each sampled token moves its sequence's grammar on (or arms it: the spec's start_after token); a grammar
    that fails (its parser limits, a token it refuses) ends that request as a bad request naming the field."""
    for seq in [s for s in sampled if s.grammar is not None]:
        token = sampled[seq].token_id
        if not seq.grammar_armed:
            seq.grammar_armed = token == seq.params.structured_output.start_after
            continue
        if seq.grammar.is_error() or not seq.grammar.consume_token(token) or seq.grammar.is_error():
            del sampled[seq]   # (a grammar past its parser limits is in error, and would otherwise look complete)
            spec = seq.params.structured_output
            failed[seq] = InvalidRequestError(f"{spec.field}: the grammar failed at output token {token} (too complex "
                                              f"for the parser's limits?): {seq.grammar.get_error().splitlines()[0][:300]}",
                                              spec.field)
