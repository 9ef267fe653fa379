"""LoRA adapters: read PEFT adapters, keep up to max_loras of them on the device in one pool, apply them per row.

Each adapter's weights live in host memory once loaded; the pool holds, per (layer, projection), stacked
A [slots, max_rank, in] and B [slots, out, max_rank] with the scaling folded into B and ranks zero-padded.
A request holds its adapter's slot from admission to finish, so a slot is only refilled when no running
sequence uses it (least recently used first). One batch mixes the base model and any resident adapters:
the runner gives every token its slot (-1: base), and each projection adds x @ A[slot]^T @ B[slot]^T
(kernels/lora.py: one gather-style Triton launch per projection on CUDA, a loop over slots in torch).
"""
import asyncio
import json
import math
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open

from server.layers.partition import Shard
from server.models.model_config import ModelConfig
from server.cpu_threads import release_idle_team

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.[\w-]+)?\.weight$")


class LoRAError(ValueError):
    """An adapter that cannot be served: says what is wrong and changes nothing."""


@dataclass(eq=False)
class LoRAAdapter:
    name: str
    path: Path
    id: int                                  # unique per load; roots the adapter's prefix-cache hashes
    rank: int
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]  # (layer, proj) -> (A [r, in], scale * B [out, r])


def projection_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in, out) features of each projection."""
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    h, i = cfg.hidden_size, cfg.intermediate_size
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


MAX_CONFIG_BYTES = 64 * 1024   # an adapter_config.json is a few hundred bytes; a bigger one is refused unread


def load_adapter(name: str, path: str | Path, cfg: ModelConfig, adapter_id: int, max_rank: int,
                 root: Path | None = None) -> LoRAAdapter:
    """A PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors), checked against the base.
    root: every file read must resolve to inside it (a symlink that leads out is refused)."""
    try:
        path = Path(path)
        config_file, weights_file = path / "adapter_config.json", path / "adapter_model.safetensors"
        for file in (config_file, weights_file):
            if root is not None and file.exists() and not file.resolve().is_relative_to(root):
                raise LoRAError(f"{file} leads outside --lora-dir (a symlink?); adapters are read from inside it only")
        if root is not None:   # read what was checked, not whatever a link swapped in since points at
            config_file, weights_file = config_file.resolve(), weights_file.resolve()
        if not config_file.is_file():
            raise LoRAError(f"{path} is not a PEFT adapter: adapter_config.json not found")
        if not weights_file.is_file():
            pickled = (path / "adapter_model.bin").is_file()
            raise LoRAError(f"{path}: adapter_model.safetensors not found"
                            + (" (adapter_model.bin is never loaded: lmserve reads safetensors only)" if pickled else ""))
        if config_file.stat().st_size > MAX_CONFIG_BYTES:
            raise LoRAError(f"{config_file} is larger than {MAX_CONFIG_BYTES} bytes; not an adapter config")
        raw = config_file.read_bytes()
    except (OSError, ValueError) as e:   # an over-long path, a NUL byte, an unreadable file
        if isinstance(e, LoRAError):
            raise
        raise LoRAError(f"the adapter path cannot be read: {e}") from None
    config, rank, alpha = _adapter_config(config_file, raw, max_rank)
    scaling = alpha / rank ** 0.5 if config.get("use_rslora") else alpha / rank
    shapes = projection_shapes(cfg)
    parts: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    try:
        with safe_open(str(weights_file), framework="pt", device="cpu") as f:
            for key in f.keys():
                m = _KEY.search(key)
                if m is None:
                    raise LoRAError(f"{path}: unexpected tensor {key!r}; lmserve serves LoRA on "
                                    f"{', '.join(PROJECTIONS)} of the decoder layers")
                layer, proj, ab = int(m.group(1)), m.group(2), m.group(3)
                if proj not in shapes:
                    raise LoRAError(f"{path}: unknown target module {proj!r} in {key!r}; "
                                    f"allowed: {', '.join(PROJECTIONS)}")
                if layer >= cfg.num_layers:
                    raise LoRAError(f"{path}: {key!r} names layer {layer}, the base model has {cfg.num_layers}")
                parts.setdefault((layer, proj), {})[ab] = f.get_tensor(key)
    except LoRAError:
        raise
    except Exception as e:   # safetensors' own errors: a malformed header, a truncated file
        raise LoRAError(f"{weights_file}: not a readable safetensors file ({e})") from None
    if not parts:
        raise LoRAError(f"{path}: the adapter has no LoRA weights")
    weights = {}
    for (layer, proj), ab in sorted(parts.items()):
        if set(ab) != {"A", "B"}:
            raise LoRAError(f"{path}: layer {layer} {proj} lacks its lora_{'B' if 'A' in ab else 'A'} weight")
        fan_in, fan_out = shapes[proj]
        a, b = ab["A"].float(), ab["B"].float()
        if a.shape != (rank, fan_in) or b.shape != (fan_out, rank):
            raise LoRAError(f"{path}: layer {layer} {proj} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; "
                            f"the base model needs ({rank}, {fan_in}) and ({fan_out}, {rank})")
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise LoRAError(f"{path}: layer {layer} {proj} has NaN or infinite weights")
        weights[(layer, proj)] = (a, b * scaling)
    return LoRAAdapter(name, path, adapter_id, rank, weights)


def _adapter_config(config_file: Path, raw: bytes, max_rank: int) -> tuple[dict, int, float]:
    """adapter_config.json checked field by field: (config, rank, alpha)."""
    try:
        config = json.loads(raw)
    except (ValueError, RecursionError) as e:   # RecursionError: JSON nested deeper than the parser goes
        raise LoRAError(f"{config_file}: not valid JSON ({type(e).__name__})") from None
    if not isinstance(config, dict):
        raise LoRAError(f"{config_file}: must be a JSON object; got {type(config).__name__}")
    rank, alpha = config.get("r", 8), config.get("lora_alpha", 8)
    if not isinstance(rank, int) or isinstance(rank, bool):
        raise LoRAError(f"{config_file}: r must be an integer rank; got {json.dumps(rank)[:40]}")
    if not 1 <= rank <= max_rank:
        raise LoRAError(f"{config_file}: rank r={rank} is outside 1..{max_rank} (--max-lora-rank)")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise LoRAError(f"{config_file}: lora_alpha must be a finite number; got {json.dumps(alpha)[:40]}")
    for key in ("use_rslora", "use_dora", "fan_in_fan_out"):
        if key in config and not isinstance(config[key], bool) and config[key] is not None:
            raise LoRAError(f"{config_file}: {key} must be true or false; got {json.dumps(config[key])[:40]}")
    if config.get("peft_type", "LORA") != "LORA":
        raise LoRAError(f"{config_file}: peft_type {json.dumps(config.get('peft_type'))[:40]} is not supported; "
                        f"only LORA")
    for key in ("use_dora", "fan_in_fan_out"):
        if config.get(key):
            raise LoRAError(f"{config_file}: {key} adapters are not supported")
    if config.get("bias", "none") != "none" or config.get("modules_to_save"):
        raise LoRAError(f"{config_file}: adapters that train biases or whole modules (bias, modules_to_save) are "
                        f"not supported")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise LoRAError(f"{config_file}: per-module rank_pattern / alpha_pattern is not supported")
    return config, rank, float(alpha)


class LoRAPool:
    """Device slots for adapters, and the per-step row assignment the projections read."""

    def __init__(self, shards: dict[str, tuple[Shard, Shard]], max_loras: int, max_rank: int, dtype: torch.dtype,
                 device: torch.device, add_lora: Callable):
        # shards: each projection's (input, output) features this tensor-parallel rank holds (the model's lora_shards)
        self.shards, self.max_loras, self.max_rank = shards, max_loras, max_rank
        self.dtype, self.device, self.add_lora = dtype, device, add_lora
        self.ranks = torch.zeros(max_loras, dtype=torch.int32, device=device)
        self.a: dict[tuple[int, str], torch.Tensor] = {}   # [slots, R, in], allocated when first needed
        self.b: dict[tuple[int, str], torch.Tensor] = {}   # [slots, out, R]
        self.resident: OrderedDict[LoRAAdapter, int] = OrderedDict()   # adapter -> slot, least recent first
        self.in_use: dict[LoRAAdapter, int] = {}
        self._freed = asyncio.Condition()
        self.token_slots: torch.Tensor | None = None   # this step's slot per token (-1: base); set by the runner
        self.pending: list[tuple[int, LoRAAdapter]] | None = None   # with tensor parallelism: installs the
                                                                     # other ranks have yet to make (the runner sends them)

    async def acquire(self, adapter: LoRAAdapter) -> int:
        """Makes the adapter resident (waiting while every slot serves running requests) and pins it."""
        async with self._freed:
            while adapter not in self.resident and not self._has_room():
                await self._freed.wait()
            if adapter not in self.resident:
                self._install(adapter)
                release_idle_team()   # the copies may have run in parallel on this (the event loop's) thread
            self.resident.move_to_end(adapter)
            self.in_use[adapter] = self.in_use.get(adapter, 0) + 1
            return self.resident[adapter]

    async def release(self, adapter: LoRAAdapter):
        async with self._freed:
            self.in_use[adapter] -= 1
            if not self.in_use[adapter]:
                del self.in_use[adapter]
                self._freed.notify_all()

    async def wait_idle(self, adapter: LoRAAdapter):
        async with self._freed:
            await self._freed.wait_for(lambda: adapter not in self.in_use)

    def evict(self, adapter: LoRAAdapter):
        """Drops an idle adapter from its slot (after unloading it)."""
        assert adapter not in self.in_use
        self.resident.pop(adapter, None)

    def slot_of(self, adapter: LoRAAdapter | None) -> int:
        return -1 if adapter is None else self.resident[adapter]

    def _has_room(self) -> bool:
        return len(self.resident) < self.max_loras or any(a not in self.in_use for a in self.resident)

    def _install(self, adapter: LoRAAdapter):
        if len(self.resident) < self.max_loras:
            slot = next(s for s in range(self.max_loras) if s not in self.resident.values())
        else:
            victim = next(a for a in self.resident if a not in self.in_use)   # least recently used idle one
            slot = self.resident.pop(victim)
        self.fill(slot, adapter)
        self.resident[adapter] = slot
        if self.pending is not None:
            self.pending.append((slot, adapter))

    def fill(self, slot: int, adapter: LoRAAdapter):
        """Writes this rank's share of the adapter's A and B into a slot (a row-parallel projection's A by its
        input columns, a column-parallel one's B by its output rows)."""
        for key in set(self.a) | set(adapter.weights):
            inp, out = self.shards[key[1]]
            if key not in self.a:
                self.a[key] = torch.zeros(self.max_loras, self.max_rank, inp.size, dtype=self.dtype, device=self.device)
                self.b[key] = torch.zeros(self.max_loras, out.size, self.max_rank, dtype=self.dtype, device=self.device)
            self.a[key][slot].zero_()
            self.b[key][slot].zero_()
            if key in adapter.weights:
                a, b = adapter.weights[key]
                self.a[key][slot, :adapter.rank].copy_(a[:, inp.start:inp.start + inp.size])
                self.b[key][slot, :, :adapter.rank].copy_(b[out.start:out.start + out.size])
        self.ranks[slot] = adapter.rank

    def apply(self, layer: int, proj: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # x: [T, in]; y: [T, out] the base projection, to which each token's adapter delta is added in place.
        key = (layer, proj)
        if self.token_slots is None or key not in self.a:
            return y
        return self.add_lora(y, x, self.a[key], self.b[key], self.ranks, self.token_slots)
