"""Evaluation: perplexity, generation metrics, lm-evaluation-harness tasks and suites.

Knows checkpoints, the inference path and the data readers. Never imports the CLI (Typer, Rich) or the trainer.
"""
