"""The Llama family (Llama, Mistral, Qwen2): one skeleton, config switches for biases, ties and sliding windows.

Parameter names mirror the Hugging Face checkpoints so the loader maps tensors by name.
"""
import torch
from torch import nn

from server.layers.attention import AttentionMetadata
from server.layers.linear import Linear, LinearFactory, fuse_for_cpu
from server.layers.ops import Ops
from server.layers.norm import RMSNorm
from server.layers.rotary import RotaryEmbedding
from server.models.model_config import ModelConfig


def _project(module: nn.Module, name: str, layer_idx: int, x: torch.Tensor, lora) -> torch.Tensor:
    """One projection, plus each row's LoRA delta when adapters are in the batch (server/lora.py)."""
    y = getattr(module, name)(x)
    return y if lora is None else lora.apply(layer_idx, name, x, y)


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding, window: int | None, linear: LinearFactory,
                 layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.ops = linear.ops
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.window = window
        self.scale = cfg.head_dim ** -0.5
        self.rotary = rotary
        self.q_proj = linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=cfg.o_bias)
        self.qkv = None   # on CPU: q, k and v as one matmul (fuse_for_cpu), set at load

    def fuse_for_cpu(self):
        self.qkv = fuse_for_cpu([self.q_proj, self.k_proj, self.v_proj])

    def forward(self, positions, x, kv_cache, meta: AttentionMetadata, lora=None):
        # x: [T, D]
        i = self.layer_idx
        if self.qkv is not None:
            q, k, v = self.qkv(x)
            if lora is not None:
                q, k, v = (lora.apply(i, name, x, y) for name, y in zip(("q_proj", "k_proj", "v_proj"), (q, k, v)))
        else:
            q, k, v = (_project(self, name, i, x, lora) for name in ("q_proj", "k_proj", "v_proj"))
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        q, k = self.rotary(positions, q, k)
        o = self.ops.paged_attention(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale, self.window)
        return _project(self, "o_proj", i, o.view(-1, self.num_heads * self.head_dim), lora)


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, linear: LinearFactory, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.ops = linear.ops
        self.gate_proj = linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.gate_up = None   # on CPU: gate and up as one matmul (fuse_for_cpu), set at load

    def fuse_for_cpu(self):
        self.gate_up = fuse_for_cpu([self.gate_proj, self.up_proj])

    def forward(self, x, lora=None):
        i = self.layer_idx
        if self.gate_up is not None:
            gate, up = self.gate_up(x)
            if lora is not None:
                gate, up = lora.apply(i, "gate_proj", x, gate), lora.apply(i, "up_proj", x, up)
        else:
            gate, up = _project(self, "gate_proj", i, x, lora), _project(self, "up_proj", i, x, lora)
        return _project(self, "down_proj", i, self.ops.silu_and_mul(gate, up), lora)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding, window: int | None, linear: LinearFactory,
                 layer_idx: int):
        super().__init__()
        self.self_attn = LlamaAttention(cfg, rotary, window, linear, layer_idx)
        self.mlp = LlamaMLP(cfg, linear, layer_idx)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, linear.ops)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, linear.ops)

    def forward(self, positions, x, residual, kv_cache, meta, lora=None):
        if residual is None:
            residual = x
            x = self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x, kv_cache, meta, lora)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x, lora), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int, linear: LinearFactory):
        super().__init__()
        rotary = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling, linear.ops)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, rotary, w, linear, i) for i, w in enumerate(cfg.sliding_windows))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, linear.ops)

    def forward(self, input_ids, positions, kv_caches, meta, lora=None):
        x, residual = self.embed_tokens(input_ids), None
        for layer, kv_cache in zip(self.layers, kv_caches):
            x, residual = layer(positions, x, residual, kv_cache, meta, lora)
        x, _ = self.norm(x, residual)
        return x


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int, linear: LinearFactory):
        super().__init__()
        self.config = cfg
        self.ops: Ops = linear.ops
        self.quant = linear.quant
        self.model = LlamaModel(cfg, max_positions, linear)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids, positions, kv_caches, meta, lora=None) -> torch.Tensor:
        # input_ids, positions: [T]; lora: a LoRAPool whose batch rows are set, or None; returns hidden states [T, D]
        return self.model(input_ids, positions, kv_caches, meta, lora)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
