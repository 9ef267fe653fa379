"""The attention metadata the model runner builds for kernels/paged_attention.py (Triton and torch reference).

The model runner lays the flat batch out as AttentionGroups: B sequences that each advance by the same n
tokens, contiguous in the batch. All decodes form one group (n = 1); prompt chunks of equal length another.
"""
from dataclasses import dataclass, field

import torch


@dataclass
class AttentionGroup:
    tokens: slice                 # rows of the flat batch this group owns
    block_tables: torch.Tensor    # [B, MB] cache blocks holding each row's keys (padding points at block 0, masked)
    query_positions: torch.Tensor  # [B, Q] position of every query
    _masks: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        return self.query_positions.shape

    def mask(self, window: int | None, block_size: int) -> torch.Tensor:
        # [B, 1, Q, MB * block_size]: key j is visible from query at position p when j <= p (and p - j < window).
        if window not in self._masks:
            num_keys = self.block_tables.shape[1] * block_size
            key_pos = torch.arange(num_keys, device=self.block_tables.device)[None, None, :]
            q_pos = self.query_positions[:, :, None]
            visible = key_pos <= q_pos
            if window is not None:
                visible &= key_pos > q_pos - window
            self._masks[window] = visible[:, None]
        return self._masks[window]


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor    # [T] cache slot where each new token's K/V goes
    groups: list[AttentionGroup]
