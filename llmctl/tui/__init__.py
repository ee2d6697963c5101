"""Textual apps: the chat UI (and, later, the training monitor)."""
