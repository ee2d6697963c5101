"""`llmctl chat`: Interactive chat with a checkpoint."""

from llmctl.commands.placeholder import placeholder_app

app = placeholder_app("chat", "Interactive chat with a checkpoint")
