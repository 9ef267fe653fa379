"""TrainConfig: every fine-tuning knob in one validated dataclass (the CLI fills it, tests build it directly)."""
from dataclasses import dataclass

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class TrainConfig:
    model: str                          # base Hugging Face checkpoint directory
    data: str                           # JSONL training data
    output: str                         # adapter directory to write
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.1
    target: tuple[str, ...] = ("q_proj", "v_proj")
    epochs: int = 3
    lr: float = 2e-4
    batch_size: int = 8
    grad_accum: int = 1                 # micro-batches per optimizer step
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    val_fraction: float = 0.1           # share of the examples held out for validation loss
    early_stopping_patience: int = 0    # epochs without a better validation loss before stopping; 0: never
    max_length: int = 1024              # tokens per example, at most (longer ones are cut, and counted)
    seed: int = 0
    resume: bool = False                # continue from output/checkpoint
    device: str = "auto"

    def __post_init__(self):
        if isinstance(self.target, str):
            self.target = tuple(t.strip() for t in self.target.split(",") if t.strip())
        unknown = [t for t in self.target if t not in LORA_TARGETS]
        if not self.target or unknown:
            raise ValueError(f"target must be a comma-separated subset of {','.join(LORA_TARGETS)}; got {','.join(self.target)}")
        for name in ("rank", "epochs", "batch_size", "grad_accum", "max_length"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer; got {getattr(self, name)!r}")
        if self.alpha <= 0 or self.lr <= 0:
            raise ValueError(f"alpha and lr must be positive; got alpha={self.alpha}, lr={self.lr}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1); got {self.dropout}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1); got {self.val_fraction}")
        if self.warmup_steps < 0 or self.early_stopping_patience < 0 or self.max_grad_norm <= 0:
            raise ValueError("warmup_steps and early_stopping_patience must be >= 0, max_grad_norm > 0")
