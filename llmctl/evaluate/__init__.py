"""Evaluation: perplexity, generation metrics, lm-evaluation-harness tasks and suites."""
