"""Iteration-level scheduler: each step, which sequences advance and by how many tokens.

There is no prefill phase and no decode phase: a sequence has tokens known (prompt + output) and tokens
computed (K/V in the cache), and each step closes part of that gap within a token budget. A decode is
a gap of one; a long prompt closes over several steps (chunked prefill) while running decodes keep
moving. When KV blocks run out, the newest running sequence is preempted: its blocks are freed and it
waits at the head of the queue to be recomputed, with the prefix cache catching what is still there.
"""
from collections import deque
from dataclasses import dataclass

from batching.kv_cache import BlockManager
from batching.sequence import FinishReason, Sequence, SequenceStatus


@dataclass
class ScheduledSequence:
    seq: Sequence
    num_new_tokens: int

    @property
    def samples(self) -> bool:
        """Whether this step computes the sequence's last known token, so a new one is sampled."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSequence]
    num_preempted: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence):
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledSequence] = []
        preempted = 0
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.block_manager.can_append(seq, n):
                victim = self.running.pop()
                self._preempt(victim)
                preempted += 1
                if victim is seq:
                    break
            else:
                self.block_manager.append_slots(seq, n)
                scheduled.append(ScheduledSequence(seq, n))
                budget -= n
                i += 1
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted:
            seq = self.waiting[0]
            hit = self.block_manager.find_prefix(seq)
            n = min(seq.num_tokens - hit.num_blocks * self.block_manager.block_size, budget)
            if not self.block_manager.can_allocate(seq, hit, n):
                break
            self.waiting.popleft()
            self.block_manager.allocate(seq, hit, n)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append(ScheduledSequence(seq, n))
            budget -= n
        return SchedulerOutput(scheduled, preempted)

    def _preempt(self, seq: Sequence):
        self.block_manager.free_sequence(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def update(self, out: SchedulerOutput, sampled: dict, eos_token_ids: tuple[int, ...]) -> list[Sequence]:
        """Record a finished step: computed counts, sampled tokens, stop checks. Returns sequences that got a token."""
        advanced = []
        for item in out.scheduled:
            seq = item.seq
            if seq.is_finished:          # aborted while the step ran
                continue
            seq.num_computed_tokens += item.num_new_tokens
            self.block_manager.register_computed_blocks(seq)
            if seq not in sampled:
                continue
            token = sampled[seq].token_id
            seq.token_ids.append(token)
            advanced.append(seq)
            reason = _stop_reason(seq, token, eos_token_ids)
            if reason is not None:
                self.finish(seq, reason)
        return advanced

    def finish(self, seq: Sequence, reason: FinishReason):
        """End a sequence (stop, length or abort) and free its blocks; safe to call on any live sequence."""
        if seq.is_finished:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free_sequence(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason


def _stop_reason(seq: Sequence, token: int, eos_token_ids: tuple[int, ...]) -> FinishReason | None:
    p = seq.params
    if seq.grammar is not None and seq.grammar_armed and seq.grammar.is_stopped():   # complete: nothing may follow
        return FinishReason.STOP
    if seq.num_output_tokens >= p.min_tokens:
        if token in p.stop_token_ids or (not p.ignore_eos and token in eos_token_ids):
            return FinishReason.STOP
    if seq.num_output_tokens >= seq.max_tokens:
        return FinishReason.LENGTH
    return None
