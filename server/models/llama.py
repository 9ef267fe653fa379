"""The Llama family (Llama, Mistral, Qwen2): one skeleton, config switches for biases, ties and sliding windows.

q/k/v run as one projection (qkv_proj) and gate/up as another (gate_up_proj); checkpoint_parts() maps the
checkpoints' projection names onto them. Under tensor parallelism (Megatron-style) each rank holds its heads
of q/k/v (key/value heads repeated over the ranks when there are fewer of them), its columns of gate/up, the
matching input slices of o_proj and down_proj (summed over the ranks by one all-reduce each), and its rows of
the embedding and lm_head (logits gathered on rank 0).
"""
import torch
from torch import nn

from server.layers.attention import AttentionMetadata
from server.layers.embedding import VocabEmbedding, vocab_shard
from server.layers.linear import Linear, LinearFactory
from server.layers.ops import Ops
from server.layers.norm import RMSNorm
from server.layers.partition import Partition, Partitioned, Shard, even_shard
from server.layers.rotary import RotaryEmbedding
from server.models.model_config import ModelConfig
from server.tensor_parallel import SINGLE, TensorParallel

FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def head_shards(cfg: ModelConfig, tp: TensorParallel) -> tuple[Shard, Shard]:
    """This rank's query and key/value features: its query heads, and the key/value heads they read (the same
    one on several ranks when there are fewer key/value heads than ranks)."""
    heads, kv_heads, dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q = even_shard(heads, tp.rank, tp.size, "num_attention_heads")
    if kv_heads >= tp.size:
        kv = even_shard(kv_heads, tp.rank, tp.size, "num_key_value_heads")
    elif tp.size % kv_heads:
        raise ValueError(f"the tensor-parallel size {tp.size} must divide num_key_value_heads ({kv_heads}) or be "
                         f"a multiple of it")
    else:
        kv = Shard(kv_heads, tp.rank // (tp.size // kv_heads), 1)
    return Shard(heads * dh, q.start * dh, q.size * dh), Shard(kv_heads * dh, kv.start * dh, kv.size * dh)


def check_tensor_parallel(cfg: ModelConfig, size: int):
    """Raises ValueError unless `size` ranks can split the model's heads and MLP (before any rank starts)."""
    tp = TensorParallel(rank=0, size=size)
    head_shards(cfg, tp)
    even_shard(cfg.intermediate_size, 0, size, "intermediate_size")


def _project(module: nn.Module, name: str, layer_idx: int, x: torch.Tensor, lora) -> torch.Tensor:
    """One projection, plus each row's LoRA delta when adapters are in the batch (server/lora.py)."""
    y = getattr(module, name)(x)
    return y if lora is None else lora.apply(layer_idx, name, x, y)


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding, window: int | None, linear: LinearFactory,
                 layer_idx: int, tp: TensorParallel):
        super().__init__()
        self.layer_idx, self.tp = layer_idx, tp
        self.ops = linear.ops
        q, kv = head_shards(cfg, tp)
        self.num_heads, self.num_kv_heads, self.head_dim = q.size // cfg.head_dim, kv.size // cfg.head_dim, cfg.head_dim
        self.window = window
        self.scale = cfg.head_dim ** -0.5
        self.rotary = rotary
        hidden = Shard.whole(cfg.hidden_size)
        self.qkv_proj = linear(Partition((q, kv, kv), hidden), bias=cfg.qkv_bias)
        self.o_proj = linear(Partition((hidden,), q), bias=cfg.o_bias)

    def forward(self, positions, x, kv_cache, meta: AttentionMetadata, lora=None):
        # x: [T, D]
        i = self.layer_idx
        q, k, v = self.qkv_proj(x).split(self.qkv_proj.partition.out_sizes, dim=-1)
        if lora is not None:
            q, k, v = (lora.apply(i, name, x, y) for name, y in zip(FUSED["qkv_proj"], (q, k, v)))
        if self.ops.name == "triton":   # the kernels read q, k and v densely
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        q, k = self.rotary(positions, q, k)
        o = self.ops.paged_attention(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale, self.window)
        return self.tp.all_reduce(_project(self, "o_proj", i, o.view(-1, self.num_heads * self.head_dim), lora))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, linear: LinearFactory, layer_idx: int, tp: TensorParallel):
        super().__init__()
        self.layer_idx, self.tp = layer_idx, tp
        self.ops = linear.ops
        hidden = Shard.whole(cfg.hidden_size)
        inter = even_shard(cfg.intermediate_size, tp.rank, tp.size, "intermediate_size")
        self.gate_up_proj = linear(Partition((inter, inter), hidden), bias=cfg.mlp_bias)
        self.down_proj = linear(Partition((hidden,), inter), bias=cfg.mlp_bias)

    def forward(self, x, lora=None):
        i = self.layer_idx
        gate, up = self.gate_up_proj(x).split(self.gate_up_proj.partition.out_sizes, dim=-1)
        if lora is not None:
            gate, up = lora.apply(i, "gate_proj", x, gate), lora.apply(i, "up_proj", x, up)
        if self.ops.name == "triton":   # the kernel reads gate and up densely
            gate, up = gate.contiguous(), up.contiguous()
        return self.tp.all_reduce(_project(self, "down_proj", i, self.ops.silu_and_mul(gate, up), lora))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding, window: int | None, linear: LinearFactory,
                 layer_idx: int, tp: TensorParallel):
        super().__init__()
        self.self_attn = LlamaAttention(cfg, rotary, window, linear, layer_idx, tp)
        self.mlp = LlamaMLP(cfg, linear, layer_idx, tp)
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
    def __init__(self, cfg: ModelConfig, max_positions: int, linear: LinearFactory, tp: TensorParallel):
        super().__init__()
        rotary = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling, linear.ops)
        self.embed_tokens = VocabEmbedding(cfg.vocab_size, cfg.hidden_size, tp)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, rotary, w, linear, i, tp)
                                    for i, w in enumerate(cfg.sliding_windows))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, linear.ops)

    def forward(self, input_ids, positions, kv_caches, meta, lora=None):
        x, residual = self.embed_tokens(input_ids), None
        for layer, kv_cache in zip(self.layers, kv_caches):
            x, residual = layer(positions, x, residual, kv_cache, meta, lora)
        x, _ = self.norm(x, residual)
        return x


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int, linear: LinearFactory, tp: TensorParallel = SINGLE):
        super().__init__()
        self.config, self.tp = cfg, tp
        self.ops: Ops = linear.ops
        self.quant = linear.quant
        self.model = LlamaModel(cfg, max_positions, linear, tp)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size,
                              partition=Partition((vocab_shard(cfg.vocab_size, tp),), Shard.whole(cfg.hidden_size)))
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.num_kv_heads = self.model.layers[0].self_attn.num_kv_heads   # this rank's: the KV cache's heads

    def forward(self, input_ids, positions, kv_caches, meta, lora=None) -> torch.Tensor:
        # input_ids, positions: [T]; lora: a LoRAPool whose batch rows are set, or None; returns hidden states [T, D]
        return self.model(input_ids, positions, kv_caches, meta, lora)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """[T, V] float32 logits on rank 0 (every rank must call it; the others get None)."""
        logits = self.tp.gather_last_dim(self.lm_head(hidden))
        return None if logits is None else logits[..., :self.config.vocab_size].float()

    def checkpoint_parts(self) -> dict[str, tuple[Partitioned, int]]:
        """Each checkpoint module name (model.layers.0.self_attn.q_proj) -> the module holding its tensors and
        which of its projections it is."""
        parts = {}
        for name, module in self.named_modules():
            if isinstance(module, Partitioned):
                prefix, _, leaf = name.rpartition(".")
                for i, checkpoint_leaf in enumerate(FUSED.get(leaf, (leaf,))):
                    parts[f"{prefix}.{checkpoint_leaf}" if prefix else checkpoint_leaf] = (module, i)
        return parts

    def lora_shards(self) -> dict[str, tuple[Shard, Shard]]:
        """Each projection LoRA can adapt -> (input, output) features this rank holds."""
        return {name.rpartition(".")[2]: (module.partition.inp, module.partition.outs[part])
                for name, (module, part) in self.checkpoint_parts().items() if name.startswith("model.layers.0.")}
