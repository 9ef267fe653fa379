"""python -m server.quantize: write a GPTQ checkpoint (GPTQ or round-to-nearest) that lmserve and auto-gptq load.

GPTQ runs layer by layer, as auto-gptq does: the calibration inputs of decoder layer i are what the already
quantized layers 0..i-1 produce, and within a layer the projections are quantized in forward order (q/k/v,
o, gate/up, down), each group seeing the outputs of the groups quantized before it. Layer-wise output errors
tr(dW H dW^T) / tr(W H W^T) are reported for every projection when calibration data is given.
"""
import argparse
import json
import logging
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from kernels.quant_matmul import dequantize_gptq
from server.loader import CheckpointError, load_hf_config
from server.models.model_config import ModelConfig
from server.quantization.gptq import GPTQ
from server.quantization.rtn import quantize_rtn
from server.tokenizer import encode_chat, load_tokenizer

log = logging.getLogger("lmserve.quantize")

SUBLAYER_GROUPS = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                   ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
_WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth")


@dataclass
class QuantizeSettings:
    method: str = "gptq"          # gptq | rtn
    bits: int = 4
    group_size: int = 128
    act_order: bool = False
    sym: bool = False
    damp: float = 0.01
    num_samples: int = 128
    seq_len: int = 512

    def __post_init__(self):
        if self.method not in ("gptq", "rtn"):
            raise ValueError(f"method must be gptq or rtn; got {self.method!r}")
        if self.bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8; got {self.bits}")
        if self.group_size != -1 and (self.group_size < 8 or self.group_size % 8):
            raise ValueError(f"group_size must be -1 or a positive multiple of 8; got {self.group_size}")
        if self.act_order and self.method != "gptq":
            raise ValueError("--act-order needs --method gptq")


@dataclass
class QuantizeReport:
    layer_errors: dict[str, float] = field(default_factory=dict)  # projection -> relative layer-wise output error


def read_calibration(path: Path, tokenizer, num_samples: int, seq_len: int) -> list[torch.Tensor]:
    """JSONL lines with {"text"}, {"prompt", "completion"} or {"messages"}; a bad line is an error naming it."""
    samples = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if "messages" in row:
                ids = encode_chat(tokenizer, row["messages"], add_generation_prompt=False)
            elif "text" in row or "prompt" in row:
                text = row["text"] if "text" in row else row["prompt"] + row.get("completion", "")
                if not isinstance(text, str):
                    raise ValueError("text must be a string")
                ids = tokenizer.encode(text)
            else:
                raise ValueError('expected "text", "prompt"/"completion" or "messages"')
        except (ValueError, TypeError, KeyError) as e:
            raise ValueError(f"{path}:{number}: {e}") from None
        if ids:
            samples.append(torch.tensor([ids[:seq_len]]))
        if len(samples) == num_samples:
            break
    if not samples:
        raise ValueError(f"{path}: no calibration samples")
    return samples


class _Stop(Exception):
    pass


def _layer_inputs(model, samples: list[torch.Tensor]) -> list[tuple[tuple, dict]]:
    """(args, kwargs) that decoder layer 0 receives for each sample, caught before it runs."""
    captured = []

    def hook(module, args, kwargs):
        captured.append((args, kwargs))
        raise _Stop

    handle = model.model.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for ids in samples:
            try:
                model(ids.to(model.device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return captured


def _run_layer(layer, inputs):
    outputs = []
    for args, kwargs in inputs:
        out = layer(*args, **kwargs)
        outputs.append(out[0] if isinstance(out, tuple) else out)
    return outputs


def _with_hidden_states(args: tuple, kwargs: dict, hidden: torch.Tensor):
    if args:
        return (hidden,) + args[1:], kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _relative_error(gptq: GPTQ, dequant: torch.Tensor) -> float:
    w = gptq.weight.float()
    d = w - dequant
    return (torch.trace(d @ gptq.hessian @ d.t()) / torch.trace(w @ gptq.hessian @ w.t())).item()


@torch.no_grad()
def quantize_model(model, settings: QuantizeSettings, samples: list[torch.Tensor] | None):
    """Quantizes every decoder projection of an HF Llama-family model in place (weights replaced by their
    dequantized values) and returns ({name: GPTQ tensors}, report)."""
    s = settings
    tensors, report = {}, QuantizeReport()
    inputs = _layer_inputs(model, samples) if samples else None
    for i, layer in enumerate(model.model.layers):
        for group in SUBLAYER_GROUPS:
            linears = {name: layer.get_submodule(name) for name in group}
            stats = {name: GPTQ(m.weight.data) for name, m in linears.items()} if inputs is not None else {}
            if inputs is not None:
                hooks = [m.register_forward_hook(lambda mod, args, out, g=stats[name]: g.add_batch(args[0]))
                         for name, m in linears.items()]
                _run_layer(layer, inputs)
                for h in hooks:
                    h.remove()
            for name, m in linears.items():
                if s.method == "gptq":
                    packed, dequant = stats[name].quantize(s.bits, s.group_size, s.act_order, s.sym, s.damp)
                else:
                    packed = quantize_rtn(m.weight.data, s.bits, s.group_size, s.sym)
                    dequant = dequantize_gptq(packed["qweight"], packed["qzeros"], packed["scales"].float(),
                                              packed["g_idx"], s.bits).t()
                full = f"model.layers.{i}.{name}"
                if inputs is not None:
                    report.layer_errors[full] = _relative_error(stats[name], dequant)
                m.weight.data.copy_(dequant.to(m.weight.dtype))
                tensors[full] = {k: v.cpu() for k, v in packed.items()}
                if m.bias is not None:
                    tensors[full]["bias"] = m.bias.data.half().cpu()
        if inputs is not None:
            inputs = [_with_hidden_states(args, kwargs, out) for out, (args, kwargs) in zip(_run_layer(layer, inputs), inputs)]
        log.info("layer %d/%d quantized", i + 1, len(model.model.layers))
    return tensors, report


def write_checkpoint(model, source: Path, out: Path, quantized: dict[str, dict], settings: QuantizeSettings):
    out.mkdir(parents=True, exist_ok=True)
    state = {}
    for name, tensor in model.state_dict().items():
        module = name.rpartition(".")[0]
        if module not in quantized and not name.endswith("rotary_emb.inv_freq"):
            state[name] = tensor.half().contiguous()
    for module, parts in quantized.items():
        state.update({f"{module}.{k}": v.contiguous() for k, v in parts.items()})
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    qc = {"bits": settings.bits, "group_size": settings.group_size, "damp_percent": settings.damp,
          "desc_act": settings.act_order, "static_groups": False, "sym": settings.sym, "true_sequential": True,
          "quant_method": "gptq", "checkpoint_format": "gptq", "model_file_base_name": "model"}
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = qc
    config["torch_dtype"] = config["dtype"] = "float16"
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "quantize_config.json").write_text(json.dumps(qc, indent=2))
    for f in source.iterdir():  # tokenizer, chat template, generation config
        if f.is_file() and f.name not in ("config.json", "model.safetensors.index.json") and not f.name.endswith(_WEIGHT_FILES):
            shutil.copy2(f, out / f.name)


def parse_args(argv=None):
    d = QuantizeSettings()
    p = argparse.ArgumentParser(prog="python -m server.quantize", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="float Hugging Face checkpoint directory (safetensors)")
    p.add_argument("--out", required=True, help="directory to write the GPTQ checkpoint to")
    p.add_argument("--method", choices=["gptq", "rtn"], default=d.method, help="GPTQ, or round-to-nearest")
    p.add_argument("--bits", type=int, choices=[4, 8], default=d.bits)
    p.add_argument("--group-size", type=int, default=d.group_size, help="input channels per scale group; -1: one per row")
    p.add_argument("--act-order", action="store_true", help="quantize columns by decreasing activation energy (desc_act)")
    p.add_argument("--sym", action="store_true", help="symmetric grid (zero fixed at the middle)")
    p.add_argument("--damp", type=float, default=d.damp, help="Hessian dampening, as a share of its mean diagonal")
    p.add_argument("--calibration", default=None,
                   help='JSONL calibration data ({"text"}, {"prompt","completion"} or {"messages"}); needed for gptq')
    p.add_argument("--num-samples", type=int, default=d.num_samples, help="calibration samples used")
    p.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per calibration sample, at most")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda[:N]")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = QuantizeSettings(args.method, args.bits, args.group_size, args.act_order, args.sym, args.damp,
                                    args.num_samples, args.seq_len)
        if settings.method == "gptq" and not args.calibration:
            raise ValueError("--method gptq needs --calibration FILE.jsonl")
        source = Path(args.model)
        hf_config = load_hf_config(source)
        ModelConfig.from_hf(hf_config)  # refuses architectures lmserve cannot serve
        if getattr(hf_config, "quantization_config", None) is not None:
            raise ValueError(f"{source} is already quantized")
        tokenizer = load_tokenizer(source)
        samples = (read_calibration(Path(args.calibration), tokenizer, settings.num_samples, settings.seq_len)
                   if args.calibration else None)
    except (ValueError, CheckpointError, OSError) as e:
        sys.exit(f"error: {e}")
    from transformers import AutoModelForCausalLM
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    model = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32, trust_remote_code=False,
                                                 use_safetensors=True).to(device).eval()
    quantized, report = quantize_model(model, settings, samples)
    write_checkpoint(model, source, Path(args.out), quantized, settings)
    if report.layer_errors:
        errors = list(report.layer_errors.values())
        log.info("layer-wise relative output error: mean %.4g, max %.4g over %d projections",
                 sum(errors) / len(errors), max(errors), len(errors))
    log.info("wrote %d-bit %s checkpoint to %s", settings.bits, settings.method, args.out)


if __name__ == "__main__":
    main()
