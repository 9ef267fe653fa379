"""Training data: JSONL lines of {"prompt","completion"}, {"messages"} or {"text"}, tokenized with labels.

The loss covers only what the model should learn to write: the completion, the assistant turns, or all of a
plain text. A bad line is an error naming its line number; nothing is skipped silently.
"""
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

IGNORE = -100  # label of a token the loss skips


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


class DataError(ValueError):
    pass


def _chat_example(tokenizer, messages) -> Example:
    """Renders the conversation with the chat template; labels cover the assistant turns only.

    The template is rendered for growing prefixes of the conversation, so each assistant turn's tokens are
    exactly those the full rendering adds for it."""
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise ValueError('"messages" must be a non-empty list of {"role", "content"} objects')
    if not any(m.get("role") == "assistant" for m in messages):
        raise ValueError("a conversation needs at least one assistant message to learn from")
    ids, labels = [], []
    for i, message in enumerate(messages):
        if not isinstance(message.get("content"), str) or message.get("role") not in ("system", "user", "assistant"):
            raise ValueError(f"message {i} needs a role (system, user, assistant) and string content")
        if message["role"] == "assistant":
            before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
            prefix = tokenizer.encode(before, add_special_tokens=False)
        else:
            prefix = None
        text = tokenizer.apply_chat_template(messages[:i + 1], tokenize=False)
        full = tokenizer.encode(text, add_special_tokens=False)
        if prefix is not None:
            if full[:len(prefix)] != prefix or prefix[:len(ids)] != ids:
                raise ValueError("the chat template does not render the conversation as growing prefixes")
            labels += [IGNORE] * (len(prefix) - len(ids)) + full[len(prefix):]
        else:
            if full[:len(ids)] != ids:
                raise ValueError("the chat template does not render the conversation as growing prefixes")
            labels += [IGNORE] * (len(full) - len(ids))
        ids = full
    return Example(ids, labels)


def encode_line(tokenizer, row: dict) -> Example:
    if not isinstance(row, dict):
        raise ValueError("each line must be a JSON object")
    if "messages" in row:
        return _chat_example(tokenizer, row["messages"])
    if "prompt" in row or "completion" in row:
        prompt, completion = row.get("prompt"), row.get("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str) or not completion:
            raise ValueError('"prompt" and "completion" must both be strings, the completion non-empty')
        prompt_ids = tokenizer.encode(prompt)
        completion_ids = tokenizer.encode(completion, add_special_tokens=False)
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        return Example(prompt_ids + completion_ids + eos, [IGNORE] * len(prompt_ids) + completion_ids + eos)
    if "text" in row:
        if not isinstance(row["text"], str) or not row["text"]:
            raise ValueError('"text" must be a non-empty string')
        ids = tokenizer.encode(row["text"])
        return Example(ids, [IGNORE] + ids[1:] if ids and ids[0] == tokenizer.bos_token_id else list(ids))
    raise ValueError('expected {"prompt", "completion"}, {"messages"} or {"text"}')


def load_examples(path: str | Path, tokenizer, max_length: int) -> tuple[list[Example], int]:
    """All examples of the file, and how many were cut to max_length."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    examples, truncated = [], 0
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            example = encode_line(tokenizer, json.loads(line))
        except (ValueError, TypeError) as e:  # json.JSONDecodeError is a ValueError
            raise DataError(f"{path}:{number}: {e}") from None
        if len(example.input_ids) > max_length:
            truncated += 1
            example = Example(example.input_ids[:max_length], example.labels[:max_length])
        if all(label == IGNORE for label in example.labels[1:]):
            raise DataError(f"{path}:{number}: nothing to learn within {max_length} tokens (raise --max-length)")
        examples.append(example)
    if not examples:
        raise DataError(f"{path}: no examples")
    return examples, truncated


def split(examples: list[Example], val_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    num_val = round(len(examples) * val_fraction)
    if val_fraction > 0 and num_val == 0 and len(examples) > 1:
        num_val = 1
    return [examples[i] for i in order[num_val:]], [examples[i] for i in order[:num_val]]


def collate(batch: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors; the labels are not shifted (the model shifts them)."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, e in enumerate(batch):
        ids[row, :len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[row, :len(e.labels)] = torch.tensor(e.labels)
        mask[row, :len(e.input_ids)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
