"""python -m finetune: train a LoRA adapter on JSONL data and write it where `python -m server --lora` reads it."""
import argparse
import logging
import sys

from finetune.config import LORA_TARGETS, TrainConfig


def parse_args(argv=None) -> TrainConfig:
    d = TrainConfig(model="", data="", output="")
    p = argparse.ArgumentParser(prog="python -m finetune", description=__doc__.split(":", 1)[1].strip(),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="base model, as python -m server --model (default: lmserve's default model)")
    p.add_argument("--data", required=True,
                   help='JSONL: {"prompt","completion"}, {"messages"} (chat template) or {"text"} per line')
    p.add_argument("--output", required=True, help="adapter directory (adapter_config.json, adapter_model.safetensors)")
    p.add_argument("--rank", type=int, default=d.rank, help="LoRA rank r")
    p.add_argument("--alpha", type=float, default=d.alpha, help="LoRA alpha (the update is scaled by alpha / r)")
    p.add_argument("--dropout", type=float, default=d.dropout, help="dropout on the LoRA input")
    p.add_argument("--target", default=",".join(d.target), help=f"modules to adapt, from {','.join(LORA_TARGETS)}")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (cosine decay after warmup)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="examples per micro-batch")
    p.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per optimizer step")
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm, help="gradient clipping")
    p.add_argument("--val-fraction", type=float, default=d.val_fraction, help="share of examples held out")
    p.add_argument("--early-stopping-patience", type=int, default=d.early_stopping_patience,
                   help="stop after this many epochs without a better validation loss (0: never)")
    p.add_argument("--max-length", type=int, default=d.max_length, help="tokens per example, at most")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoint")
    p.add_argument("--device", default=d.device, help="auto (cuda when available), cpu, cuda[:N]")
    a = p.parse_args(argv)
    from server.model_source import resolve_model
    a.model = resolve_model(a.model).path
    return TrainConfig(model=a.model, data=a.data, output=a.output, rank=a.rank, alpha=a.alpha, dropout=a.dropout,
                       target=a.target, epochs=a.epochs, lr=a.lr, batch_size=a.batch_size, grad_accum=a.grad_accum,
                       warmup_steps=a.warmup_steps, max_grad_norm=a.max_grad_norm, val_fraction=a.val_fraction,
                       early_stopping_patience=a.early_stopping_patience, max_length=a.max_length, seed=a.seed,
                       resume=a.resume, device=a.device)


def main(argv=None):
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from finetune.data import DataError
    from finetune.trainer import train
    try:
        cfg = parse_args(argv)
        report = train(cfg)
    except (ValueError, DataError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    last = report.epochs[-1] if report.epochs else {}
    print(f"wrote {cfg.output}: {len(report.epochs)} epochs, train loss {last.get('train_loss', float('nan')):.4f}, "
          f"best validation loss {report.best_val_loss if report.best_val_loss is not None else 'n/a'}")


if __name__ == "__main__":
    main()
