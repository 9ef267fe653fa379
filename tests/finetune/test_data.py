"""Training data: loss only on what the model should write, and a bad line named by its number."""
import json

import pytest

from finetune.data import IGNORE, DataError, collate, load_examples, split
from server.tiny_model import ensure_tiny_model
from server.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ensure_tiny_model())


def write(tmp_path, rows) -> str:
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return str(path)


def targets(example) -> list[int]:
    return [t for t in example.labels if t != IGNORE]


def test_prompt_completion_learns_the_completion_and_eos_only(tokenizer, tmp_path):
    (ex,), _ = load_examples(write(tmp_path, [{"prompt": "Q: where? A: ", "completion": "Under the pot."}]), tokenizer, 512)
    completion = tokenizer.encode("Under the pot.", add_special_tokens=False)
    assert targets(ex) == completion + [tokenizer.eos_token_id]
    assert ex.input_ids[-len(completion) - 1:] == completion + [tokenizer.eos_token_id]
    assert len(ex.labels) == len(ex.input_ids)


def test_chat_learns_the_assistant_turns_only(tokenizer, tmp_path):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello there"}, {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": "See you"}]
    (ex,), _ = load_examples(write(tmp_path, [{"messages": messages}]), tokenizer, 512)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    assert ex.input_ids == tokenizer.encode(full, add_special_tokens=False)
    learned = tokenizer.decode(targets(ex))
    assert "Hello there" in learned and "See you" in learned
    assert "Hi" not in learned and "Be brief" not in learned and "Bye" not in learned


def test_text_learns_every_token_after_the_first(tokenizer, tmp_path):
    (ex,), _ = load_examples(write(tmp_path, [{"text": "plain words to learn"}]), tokenizer, 512)
    assert targets(ex) == [t for t in ex.input_ids if t != tokenizer.bos_token_id]


@pytest.mark.parametrize("line,message", [
    ("{not json", "data.jsonl:2: "),
    ('{"prompt": "only a prompt"}', 'data.jsonl:2: "prompt" and "completion" must both be strings'),
    ('{"messages": [{"role": "user", "content": "no answer"}]}', "data.jsonl:2: a conversation needs"),
    ('{"question": "x"}', "data.jsonl:2: expected"),
    ('[1, 2]', "data.jsonl:2: each line must be a JSON object")])
def test_a_bad_line_is_reported_with_its_number(tokenizer, tmp_path, line, message):
    with pytest.raises(DataError, match=message):
        load_examples(write(tmp_path, [{"text": "fine"}, line]), tokenizer, 512)


def test_long_examples_are_cut_and_counted(tokenizer, tmp_path):
    rows = [{"prompt": "a b", "completion": " ".join(["word"] * 50)}, {"text": "short"}]
    examples, truncated = load_examples(write(tmp_path, rows), tokenizer, 16)
    assert truncated == 1 and len(examples[0].input_ids) == 16


def test_split_and_collate(tokenizer, tmp_path):
    rows = [{"text": f"example number {i}"} for i in range(10)]
    examples, _ = load_examples(write(tmp_path, rows), tokenizer, 64)
    train, val = split(examples, 0.2, seed=0)
    assert len(train) == 8 and len(val) == 2 and split(examples, 0.2, seed=0) == (train, val)
    batch = collate(train[:3], pad_id=2)
    width = max(len(e.input_ids) for e in train[:3])
    assert batch["input_ids"].shape == batch["labels"].shape == (3, width)
    assert batch["attention_mask"].sum().item() == sum(len(e.input_ids) for e in train[:3])
