"""Attention over the paged KV cache (plain-torch path): write new K/V into their slots, read K/V by block table.

The model runner lays the flat batch out as AttentionGroups: B sequences that each advance by the same n
tokens, contiguous in the batch. All decodes form one group (n = 1); prompt chunks of equal length another.
"""
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


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


def paged_attention(q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float, window: int | None):
    # q: [T, Hq, Dh]; k, v: [T, Hkv, Dh]; k_cache, v_cache: [num_blocks, block_size, Hkv, Dh]
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    slots = meta.slot_mapping
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, k)
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, v)
    out = torch.empty_like(q)
    for g in meta.groups:
        batch, num_queries = g.shape
        qs = q[g.tokens].view(batch, num_queries, *q.shape[1:]).transpose(1, 2)   # [B, Hq, Q, Dh]
        # Whole blocks are gathered (index_select: 3x faster than advanced indexing on CPU), then seen as one
        # key axis of MB * block_size positions.
        blocks = g.block_tables.view(-1)
        ks = k_cache.index_select(0, blocks).view(batch, -1, num_kv_heads, head_dim).transpose(1, 2)  # [B, Hkv, S, Dh]
        vs = v_cache.index_select(0, blocks).view(batch, -1, num_kv_heads, head_dim).transpose(1, 2)
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=g.mask(window, block_size), scale=scale,
                                           enable_gqa=num_kv_heads != q.shape[1])
        out[g.tokens] = o.transpose(1, 2).reshape(-1, *q.shape[1:])
    return out
