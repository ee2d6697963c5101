"""The training engine: one loop for pretraining, finetuning and distillation, on one CPU or many GPUs.

Knows the model, the data loader, recipes and checkpoints; reports only through typed events
(`train.events`) and metrics.jsonl. Never imports the CLI (Typer, Rich).
"""
