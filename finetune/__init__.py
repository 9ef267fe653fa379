"""LoRA fine-tuning on a team's own data: python -m finetune writes a PEFT adapter that lmserve serves."""
