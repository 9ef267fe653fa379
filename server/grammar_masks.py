"""Grammar token masks on the sampler's logits: filled from llguidance matchers (server/structured_output.py) as
bits, then applied to the constrained rows as -inf."""
import math
import os

import torch

_fill_executor = None   # llguidance's pool for many rows at once; a quarter of the cores at most


def fill_bitmasks(matchers: list, vocab: int) -> torch.Tensor:
    """The tokens each matcher allows next, as bits: int32 [len(matchers), ceil(vocab / 32)] on the CPU. Safe to
    run on a thread of its own while the forward pass runs (the matchers move only after sampling). (Not through
    llguidance.torch, whose import pulls in torch.compile: seconds, once.)"""
    import llguidance
    global _fill_executor
    bitmask = torch.empty(len(matchers), (vocab + 31) // 32, dtype=torch.int32)
    row_bytes = bitmask.shape[1] * 4
    if len(matchers) == 1:
        matchers[0].unsafe_compute_mask_ptr(bitmask.data_ptr(), row_bytes)
    else:
        if _fill_executor is None:
            _fill_executor = llguidance.LLExecutor(num_threads=max(1, (os.cpu_count() or 4) // 4))
        _fill_executor.unsafe_compute_mask_ptr([(m, j) for j, m in enumerate(matchers)], bitmask.data_ptr(),
                                               row_bytes, len(matchers))
    return bitmask


def apply_bitmasks(logits: torch.Tensor, rows: list[int], bitmask: torch.Tensor) -> None:
    """In place: each listed row of logits [B, V] keeps only the tokens its bitmask row allows (the rest -inf).
    A row that the other constraints (min_tokens' ban on EOS) left with no token gets the grammar's own set."""
    vocab = logits.shape[1]
    bitmask = bitmask.to(logits.device, non_blocking=True)
    bits = torch.arange(32, dtype=torch.int32, device=logits.device)
    allowed = ((bitmask[:, :, None] >> bits) & 1).bool().view(len(rows), -1)[:, :vocab]
    index = torch.tensor(rows, device=logits.device)
    masked = logits[index].masked_fill(~allowed, -math.inf)
    nothing_left = torch.isneginf(masked).all(dim=-1, keepdim=True)
    logits[index] = torch.where(nothing_left & allowed, 0.0, masked)
