"""QuantConfig: how a model's linear layers are quantized, from --quant or detected in a GPTQ checkpoint."""
import json
from dataclasses import dataclass
from pathlib import Path

# --quant values: int8 / int4 quantize a float checkpoint at load; bnb-int8 / nf4 hand it to bitsandbytes.
# GPTQ checkpoints are detected, never requested.
QUANT_CHOICES = ("none", "int8", "int4", "bnb-int8", "nf4")


@dataclass(frozen=True)
class QuantConfig:
    method: str               # int8 | gptq (int4 RTN is stored as gptq) | bnb-int8 | nf4
    bits: int = 8
    group_size: int = -1      # input channels per scale/zero group; -1: one group for the whole row
    desc_act: bool = False    # act-order: g_idx permutes the groups
    sym: bool = True
    zero_offset: int = 1      # auto-gptq's "gptq" format stores zero - 1; "gptq_v2" stores the zero itself

    def __post_init__(self):
        if self.method == "gptq" and self.bits not in (4, 8):
            raise ValueError(f"GPTQ bits must be 4 or 8; got {self.bits}")
        if self.group_size != -1 and (self.group_size < 1 or self.group_size % 8):
            raise ValueError(f"group_size must be -1 or a positive multiple of 8; got {self.group_size}")

    def num_groups(self, in_features: int) -> int:
        return 1 if self.group_size == -1 else -(-in_features // self.group_size)


def gptq_config_in(path: Path, hf_config) -> QuantConfig | None:
    """The GPTQ settings of a checkpoint (config.json quantization_config, or quantize_config.json), if any."""
    qc = getattr(hf_config, "quantization_config", None)
    if qc is not None and not isinstance(qc, dict):
        qc = qc.to_dict()
    if qc is None and (path / "quantize_config.json").is_file():
        qc = json.loads((path / "quantize_config.json").read_text())
        qc.setdefault("quant_method", "gptq")
    if qc is None:
        return None
    method = qc.get("quant_method", "gptq")
    if method != "gptq":
        raise ValueError(f"{path}: quantization method {method!r} is not supported; lmserve reads GPTQ checkpoints "
                         f"and quantizes float ones at load (--quant int8|int4|bnb-int8|nf4)")
    if qc.get("lm_head"):
        raise ValueError(f"{path}: a quantized lm_head is not supported")
    fmt = qc.get("checkpoint_format", "gptq")
    if fmt not in ("gptq", "gptq_v2"):
        raise ValueError(f"{path}: GPTQ checkpoint_format {fmt!r} is not supported (gptq, gptq_v2)")
    return QuantConfig("gptq", bits=int(qc.get("bits", 4)), group_size=int(qc.get("group_size", 128)),
                       desc_act=bool(qc.get("desc_act", False)), sym=bool(qc.get("sym", True)),
                       zero_offset=1 if fmt == "gptq" else 0)


def resolve_quant(requested: str, group_size: int, checkpoint_gptq: QuantConfig | None) -> QuantConfig | None:
    if requested not in QUANT_CHOICES:
        raise ValueError(f"quant must be one of {', '.join(QUANT_CHOICES)}; got {requested!r}")
    if checkpoint_gptq is not None:
        if requested != "none":
            raise ValueError(f"the checkpoint is already GPTQ-quantized ({checkpoint_gptq.bits}-bit); drop --quant {requested}")
        return checkpoint_gptq
    if requested == "none":
        return None
    if requested == "int8":
        return QuantConfig("int8")
    if requested == "int4":
        return QuantConfig("gptq", bits=4, group_size=group_size, zero_offset=1, sym=False)
    return QuantConfig(requested)
