"""`llmctl eval`: Perplexity, BLEU/ROUGE, lm-eval tasks and the domain suite."""

from llmctl.commands.placeholder import placeholder_app

app = placeholder_app("eval", "Perplexity, BLEU/ROUGE, lm-eval tasks and the domain suite")
