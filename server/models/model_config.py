"""ModelConfig: the architecture facts our forward pass needs, read from a Hugging Face config."""
from dataclasses import dataclass

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class UnsupportedModelError(ValueError):
    pass


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope_theta: float
    rope_scaling: dict | None          # {"rope_type": "linear"|"llama3", ...}; None for plain RoPE
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    tie_word_embeddings: bool
    sliding_windows: tuple              # per layer: window size in tokens, or None for full attention

    @classmethod
    def from_hf(cls, hf) -> "ModelConfig":
        archs = getattr(hf, "architectures", None) or []
        arch = archs[0] if archs else None
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"unsupported architecture {arch!r}; lmserve supports {', '.join(SUPPORTED_ARCHITECTURES)}")
        if getattr(hf, "hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"unsupported hidden_act {hf.hidden_act!r}; only silu (SwiGLU) is supported")
        num_heads = hf.num_attention_heads
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // num_heads
        rope_theta, rope_scaling = _rope(hf)
        is_qwen2 = arch == "Qwen2ForCausalLM"
        attention_bias = bool(getattr(hf, "attention_bias", False))
        return cls(
            architecture=arch,
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=hf.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(hf, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            rms_norm_eps=hf.rms_norm_eps,
            max_position_embeddings=hf.max_position_embeddings,
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            qkv_bias=is_qwen2 or attention_bias,
            o_bias=attention_bias and not is_qwen2,
            mlp_bias=bool(getattr(hf, "mlp_bias", False)),
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            sliding_windows=_sliding_windows(hf, arch),
        )


def _rope(hf) -> tuple[float, dict | None]:
    # transformers >= 5 folds rope_theta and rope_scaling into rope_parameters; older configs keep them apart.
    params = dict(getattr(hf, "rope_parameters", None) or {})
    theta = params.pop("rope_theta", None) or getattr(hf, "rope_theta", None) or 10000.0
    if not params:
        params = dict(getattr(hf, "rope_scaling", None) or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"unsupported rope_scaling type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    if rope_type == "default":
        return float(theta), None
    return float(theta), {**params, "rope_type": rope_type}


def _sliding_windows(hf, arch: str) -> tuple:
    window = getattr(hf, "sliding_window", None)
    layer_types = getattr(hf, "layer_types", None)
    n = hf.num_hidden_layers
    if arch == "Qwen2ForCausalLM" and not getattr(hf, "use_sliding_window", False):
        return (None,) * n
    if layer_types:
        return tuple(window if t == "sliding_attention" else None for t in layer_types)
    if arch == "MistralForCausalLM" and window:
        return (window,) * n
    return (None,) * n
