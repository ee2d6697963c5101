"""Textual apps: the training monitor (`llmctl monitor`, `train --tui`) and the chat screen (`llmctl chat`, and
inside the monitor). Drive the engines the CLI drives; never imported by them."""
