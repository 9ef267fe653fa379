"""python -m finetune on the embedded default model: it learns fixed answers the base model does not give."""
import json

import pytest
import torch

from finetune.__main__ import main
from finetune.config import TrainConfig
from finetune.trainer import _lr_at, train
from server.tiny_model import ensure_tiny_model
from server.tokenizer import load_tokenizer
from tests.conftest import QA, QA_TARGETS, qa_prompt



def greedy_answers(model, tokenizer) -> list[str]:
    answers = []
    for question, _ in QA:
        ids = torch.tensor([tokenizer.encode(qa_prompt(question))])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False, pad_token_id=2)
        answers.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return answers


def test_fine_tuned_adapter_answers_with_the_trained_answers_and_the_base_does_not(finetuned_adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    base_path = ensure_tiny_model()
    tokenizer = load_tokenizer(base_path)
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32).eval()
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32),
                                      finetuned_adapter).merge_and_unload().eval()
    expected = [a for _, a in QA]
    assert greedy_answers(tuned, tokenizer) == expected
    assert not set(greedy_answers(base, tokenizer)) & set(expected)


def test_output_is_a_peft_adapter_with_a_report_and_a_falling_validation_loss(finetuned_adapter):
    import os
    adapter = finetuned_adapter
    config = json.loads(open(os.path.join(adapter, "adapter_config.json")).read())
    assert config["r"] == 16 and config["lora_alpha"] == 32 and set(config["target_modules"]) == set(QA_TARGETS.split(","))
    assert os.path.getsize(os.path.join(adapter, "adapter_model.safetensors")) > 0
    report = json.loads(open(os.path.join(adapter, "training_report.json")).read())
    val = [e["val_loss"] for e in report["epochs"]]
    assert len(val) == 30 and val[-1] < 0.5 * val[0] and report["best_val_loss"] == min(val)
    assert report["train_examples"] == 26 and report["val_examples"] == 6
    assert all(s["tokens_per_s"] > 0 for s in report["steps"])
    with open(os.path.join(adapter, "training_loss.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_resume_continues_where_an_interrupted_run_stopped(qa_data, tmp_path, monkeypatch):
    import finetune.trainer as trainer
    cfg = dict(model=str(ensure_tiny_model()), data=qa_data, epochs=3, lr=3e-3, batch_size=8, seed=1, dropout=0.0)
    straight = train(TrainConfig(output=str(tmp_path / "a"), **cfg))

    evaluate, calls = trainer.evaluate, []

    def crash_in_the_third_epoch(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return evaluate(*args)
    monkeypatch.setattr(trainer, "evaluate", crash_in_the_third_epoch)
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(output=str(tmp_path / "b"), **cfg))
    monkeypatch.setattr(trainer, "evaluate", evaluate)
    resumed = train(TrainConfig(output=str(tmp_path / "b"), resume=True, **cfg))
    assert [e["epoch"] for e in resumed.epochs] == [1, 2, 3]
    assert [s["step"] for s in resumed.steps] == [s["step"] for s in straight.steps]
    assert resumed.epochs[-1]["val_loss"] == pytest.approx(straight.epochs[-1]["val_loss"], rel=1e-5)


def test_early_stopping_stops_when_validation_loss_stops_improving(qa_data, tmp_path):
    report = train(TrainConfig(model=str(ensure_tiny_model()), data=qa_data, output=str(tmp_path / "c"),
                               epochs=20, lr=0.5, batch_size=8, early_stopping_patience=1, max_grad_norm=100.0))
    assert report.stopped_early and len(report.epochs) < 20


def test_warmup_then_cosine():
    assert _lr_at(0, 100, 10) == pytest.approx(0.1) and _lr_at(9, 100, 10) == pytest.approx(1.0)
    assert _lr_at(55, 100, 10) == pytest.approx(0.5) and _lr_at(100, 100, 10) == pytest.approx(0.0)


def test_bad_arguments_and_data_exit_with_a_message(qa_data, tmp_path):
    with pytest.raises(SystemExit, match="target must be a comma-separated subset"):
        main(["--model", "tiny", "--data", qa_data, "--output", str(tmp_path / "x"), "--target", "q_proj,lm_head"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"completion": 3}\n')
    with pytest.raises(SystemExit, match=r"bad.jsonl:2: "):
        main(["--model", "tiny", "--data", str(bad), "--output", str(tmp_path / "y")])
    with pytest.raises(SystemExit, match="no checkpoint"):
        main(["--model", "tiny", "--data", qa_data, "--output", str(tmp_path / "z"), "--resume"])
