"""`llmctl serve`: OpenAI-compatible HTTP API."""

from llmctl.commands.placeholder import placeholder_app

app = placeholder_app("serve", "OpenAI-compatible HTTP API")
