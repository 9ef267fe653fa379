"""The attention metadata the model runner builds for kernels/paged_attention.py (Triton and torch reference).

The model runner lays the flat batch out as AttentionGroups: B sequences that each advance by the same n
tokens, contiguous in the batch. All decodes form one group (n = 1); prompt chunks of equal length another.
"""
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class AttentionGroup:
    tokens: slice | torch.Tensor  # rows of the flat batch this group owns: a slice, or [B, Q] row indices (-1: padding)
    block_tables: torch.Tensor    # [B, MB] cache blocks holding each row's keys (padding: a never-written block, masked)
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
    _merged: list[AttentionGroup] | None = field(default=None, repr=False)

    def merged_groups(self) -> list[AttentionGroup]:
        """The groups with every multi-query group padded into one, for the torch reference: a step of prompts
        of many lengths then costs two attention calls per layer, not one per length. A row's padding has token
        index -1 and repeats its last query position, so its mask is a real row's and its output is dropped."""
        if self._merged is None:
            multi = [g for g in self.groups if g.shape[1] > 1]
            if len(multi) < 2:
                self._merged = self.groups
            else:
                num_queries = max(g.shape[1] for g in multi)
                num_blocks = max(g.block_tables.shape[1] for g in multi)
                rows, tables, positions = [], [], []
                for g in multi:
                    batch, n = g.shape
                    r = torch.arange(g.tokens.start, g.tokens.stop, device=g.query_positions.device).view(batch, n)
                    rows.append(F.pad(r, (0, num_queries - n), value=-1))
                    positions.append(_pad_right(g.query_positions, num_queries))
                    # a row's own last block pads its table: block 0 might be another's, holding NaN (0 * NaN)
                    tables.append(_pad_right(g.block_tables, num_blocks))
                merged = AttentionGroup(torch.cat(rows), torch.cat(tables), torch.cat(positions))
                self._merged = [g for g in self.groups if g.shape[1] == 1] + [merged]
        return self._merged


def _pad_right(x: torch.Tensor, width: int) -> torch.Tensor:
    # [B, n] -> [B, width], repeating each row's last column
    return torch.cat([x, x[:, -1:].expand(-1, width - x.shape[1])], dim=1)
