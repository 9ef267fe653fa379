"""The LoRA training loop: peft adapters on the base model, AdamW with warmup and a cosine decay, gradient
accumulation and clipping, bf16 autocast on CUDA, validation loss each epoch, early stopping, and a
checkpoint after every epoch that --resume continues from.
"""
import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from finetune.config import TrainConfig
from finetune.data import IGNORE, Example, collate, load_examples, split

log = logging.getLogger("lmserve.finetune")
CHECKPOINT = "checkpoint"


@dataclass
class TrainReport:
    config: dict
    train_examples: int
    val_examples: int
    truncated_examples: int
    steps: list[dict] = field(default_factory=list)     # {"step", "epoch", "loss", "lr", "tokens_per_s"}
    epochs: list[dict] = field(default_factory=list)    # {"epoch", "step", "train_loss", "val_loss"}
    best_val_loss: float | None = None
    stopped_early: bool = False


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _batches(examples: list[Example], batch_size: int, rng: random.Random | None):
    order = list(range(len(examples)))
    if rng is not None:
        rng.shuffle(order)
    for start in range(0, len(order), batch_size):
        yield [examples[i] for i in order[start:start + batch_size]]


def _loss(model, batch: dict, device: torch.device) -> tuple[torch.Tensor, int]:
    """Mean loss over the batch's target tokens, and how many there were."""
    batch = {k: v.to(device) for k, v in batch.items()}
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                             targets.reshape(-1), ignore_index=IGNORE, reduction="sum")
    count = int((targets != IGNORE).sum())
    return loss / max(count, 1), count


@torch.no_grad()
def evaluate(model, examples: list[Example], batch_size: int, pad_id: int, device) -> float | None:
    if not examples:
        return None
    model.eval()
    total, count = 0.0, 0
    for chunk in _batches(examples, batch_size, None):
        loss, n = _loss(model, collate(chunk, pad_id), device)
        total, count = total + loss.item() * n, count + n
    model.train()
    return total / max(count, 1)


def _lr_at(step: int, total: int, warmup: int) -> float:
    """Multiplier of the base learning rate: linear warmup, then a cosine decay to zero."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def train(cfg: TrainConfig) -> TrainReport:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from server.tokenizer import load_tokenizer

    torch.manual_seed(cfg.seed)
    device = _device(cfg.device)
    out = Path(cfg.output)
    tokenizer = load_tokenizer(cfg.model)
    examples, truncated = load_examples(cfg.data, tokenizer, cfg.max_length)
    train_set, val_set = split(examples, cfg.val_fraction, cfg.seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)

    base = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32, trust_remote_code=False,
                                                use_safetensors=True)
    lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=list(cfg.target),
                      task_type="CAUSAL_LM", bias="none")
    model = get_peft_model(base, lora).to(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    steps_per_epoch = math.ceil(math.ceil(len(train_set) / cfg.batch_size) / cfg.grad_accum)
    total_steps = steps_per_epoch * cfg.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_at(s, total_steps, cfg.warmup_steps))

    report = TrainReport(asdict(cfg), len(train_set), len(val_set), truncated)
    start_epoch, step, bad_epochs = 0, 0, 0
    if cfg.resume:
        start_epoch, step, bad_epochs = _load_checkpoint(out / CHECKPOINT, model, optimizer, scheduler, report)
    if truncated:
        log.warning("%d examples were longer than --max-length %d and were cut", truncated, cfg.max_length)
    rng = random.Random(cfg.seed)
    for _ in range(start_epoch):  # the same shuffles as an uninterrupted run
        list(_batches(train_set, cfg.batch_size, rng))

    for epoch in range(start_epoch, cfg.epochs):
        epoch_loss, epoch_tokens = 0.0, 0
        micro = list(_batches(train_set, cfg.batch_size, rng))
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step", leave=False,
                   disable=None)  # a live bar on a terminal; the per-epoch log lines only, otherwise
        for first in range(0, len(micro), cfg.grad_accum):
            group = micro[first:first + cfg.grad_accum]
            started = time.perf_counter()
            batches = [collate(b, pad_id) for b in group]
            targets = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)
            tokens, step_loss = 0, 0.0
            for b in batches:  # each micro-batch weighted by its share of the step's target tokens
                loss, n = _loss(model, b, device)
                (loss * n / max(targets, 1)).backward()
                step_loss += loss.item() * n
                tokens += int(b["attention_mask"].sum())
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            rate = tokens / (time.perf_counter() - started)
            report.steps.append({"step": step, "epoch": epoch + 1, "loss": step_loss / max(targets, 1),
                                 "lr": scheduler.get_last_lr()[0], "tokens_per_s": rate})
            epoch_loss, epoch_tokens = epoch_loss + step_loss, epoch_tokens + targets
            bar.set_postfix(loss=f"{step_loss / max(targets, 1):.4f}", tok_s=f"{rate:.0f}")
            bar.update()
        bar.close()
        val_loss = evaluate(model, val_set, cfg.batch_size, pad_id, device)
        train_loss = epoch_loss / max(epoch_tokens, 1)
        report.epochs.append({"epoch": epoch + 1, "step": step, "train_loss": train_loss, "val_loss": val_loss})
        log.info("epoch %d: train loss %.4f, validation loss %s", epoch + 1, train_loss,
                 "n/a" if val_loss is None else f"{val_loss:.4f}")
        improved = val_loss is not None and (report.best_val_loss is None or val_loss < report.best_val_loss)
        if improved or val_loss is None:
            if improved:
                report.best_val_loss = val_loss
            bad_epochs = 0
            model.save_pretrained(str(out))  # the adapter served is the best one seen
        else:
            bad_epochs += 1
        _save_checkpoint(out / CHECKPOINT, model, optimizer, scheduler, report, epoch + 1, step, bad_epochs)
        if cfg.early_stopping_patience and bad_epochs >= cfg.early_stopping_patience:
            report.stopped_early = True
            log.info("validation loss did not improve for %d epochs: stopping", bad_epochs)
            break
    (out / "training_report.json").write_text(json.dumps(asdict(report), indent=1))
    _plot(report, out / "training_loss.png")
    return report


def _save_checkpoint(path: Path, model, optimizer, scheduler, report, epoch, step, bad_epochs):
    from safetensors.torch import save_file
    path.mkdir(parents=True, exist_ok=True)
    trainable = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    save_file(trainable, str(path / "trainable.safetensors"))
    # Optimizer state is tensors and numbers only: saved as a state dict, read back with weights_only=True.
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, path / "optimizer.pt")
    (path / "state.json").write_text(json.dumps({"epoch": epoch, "step": step, "bad_epochs": bad_epochs,
                                                 "report": asdict(report)}))


def _load_checkpoint(path: Path, model, optimizer, scheduler, report) -> tuple[int, int, int]:
    from safetensors.torch import load_file
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"--resume: no checkpoint in {path}")
    state = json.loads((path / "state.json").read_text())
    trainable = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    for name, tensor in trainable.items():
        params[name].data.copy_(tensor)
    saved = torch.load(path / "optimizer.pt", weights_only=True)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    previous = state["report"]
    report.steps, report.epochs = previous["steps"], previous["epochs"]
    report.best_val_loss = previous["best_val_loss"]
    log.info("resuming after epoch %d (step %d)", state["epoch"], state["step"])
    return state["epoch"], state["step"], state["bad_epochs"]


def _plot(report: TrainReport, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    if report.steps:
        ax.plot([s["step"] for s in report.steps], [s["loss"] for s in report.steps], label="train (per step)", alpha=0.6)
        val = [(e["step"], e["val_loss"]) for e in report.epochs if e["val_loss"] is not None]
        if val:
            ax.plot(*zip(*val), "o-", label="validation (per epoch)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
