"""The training engine: one loop for pretraining, finetuning and distillation, on one CPU or many GPUs."""
