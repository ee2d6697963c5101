"""`llmctl finetune`: LoRA / QLoRA finetuning on instructions or domain text."""

from llmctl.commands.placeholder import placeholder_app

app = placeholder_app("finetune", "LoRA / QLoRA finetuning on instructions or domain text")
