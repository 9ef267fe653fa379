"""Scheduler: token budget, chunked prefill, seat limit, preemption of the newest, finishing frees blocks."""
import torch

from batching.scheduler import Scheduler
from batching.kv_cache import BlockManager
from server.sampling import SampledToken, SamplingParams
from batching.sequence import FinishReason, Sequence, SequenceStatus


def seq(n_prompt: int, rid: str, max_tokens: int = 100, **params) -> Sequence:
    return Sequence(rid, list(range(10, 10 + n_prompt)), SamplingParams(ignore_eos=True, **params),
                    torch.Generator(), max_tokens=max_tokens)


def step(sched: Scheduler, token: int = 1):
    out = sched.schedule()
    sampled = {s.seq: SampledToken(token) for s in out.scheduled if s.samples}
    sched.update(out, sampled, eos_token_ids=(0,))
    return out


def test_long_prompt_is_chunked_while_decodes_keep_moving():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=10)
    short = seq(3, "short")
    sched.add(short)
    step(sched)                                  # short prefilled, has 1 output token
    long = seq(25, "long")
    sched.add(long)
    plan = []
    while long.num_output_tokens == 0:
        out = step(sched)
        plan.append({s.seq.request_id: s.num_new_tokens for s in out.scheduled})
    assert plan == [{"short": 1, "long": 9}, {"short": 1, "long": 9}, {"short": 1, "long": 7}]
    assert short.num_output_tokens == 4


def test_seat_limit_holds_new_sequences_back():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=2, max_num_batched_tokens=100)
    for i in range(3):
        sched.add(seq(3, f"s{i}"))
    out = step(sched)
    assert [s.seq.request_id for s in out.scheduled] == ["s0", "s1"] and len(sched.waiting) == 1


def test_newest_running_sequence_is_preempted_and_recomputed():
    bm = BlockManager(4, 4)                     # 16 token slots
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=100)
    old, new = seq(7, "old"), seq(7, "new")
    sched.add(old)
    sched.add(new)
    step(sched)                                  # both hold 2 blocks (7 prompt tokens + 1 slot): cache full
    step(sched)                                  # position 7 still fits in block 2
    step(sched)                                  # old needs a 3rd block for position 8: new is preempted
    assert new.status is SequenceStatus.WAITING and new.num_preemptions == 1 and not new.block_table
    assert sched.waiting[0] is new and old.num_output_tokens == 3
    assert new.num_output_tokens == 2          # its sampled tokens are kept and recomputed with the prompt


def test_finish_frees_blocks_and_length_stop():
    bm = BlockManager(16, 4)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=100)
    s = seq(5, "a", max_tokens=3)
    sched.add(s)
    for _ in range(3):
        step(sched)
    assert s.is_finished and s.finish_reason is FinishReason.LENGTH and bm.num_free_blocks == 16


def test_eos_respects_min_tokens_and_ignore_eos():
    bm = BlockManager(16, 4)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=100)
    honours = Sequence("a", [5, 6], SamplingParams(min_tokens=2), torch.Generator(), max_tokens=10)
    ignores = Sequence("b", [5, 6], SamplingParams(ignore_eos=True), torch.Generator(), max_tokens=10)
    sched.add(honours)
    sched.add(ignores)
    step(sched, token=0)
    assert not honours.is_finished and not ignores.is_finished
    step(sched, token=0)
    assert honours.finish_reason is FinishReason.STOP and not ignores.is_finished
