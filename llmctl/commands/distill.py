"""`llmctl distill`: Distil a large teacher into a small student."""

from llmctl.commands.placeholder import placeholder_app

app = placeholder_app("distill", "Distil a large teacher into a small student")
