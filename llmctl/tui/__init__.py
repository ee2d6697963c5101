"""Textual apps: the chat UI (and, later, the training monitor). Drives the engines the CLI drives; never
imported by them."""
