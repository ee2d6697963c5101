"""Thin Typer front-ends: parse, validate, call an engine, print. The only place Typer and Rich are used.
Heavy imports stay inside functions so `llmctl --help` loads no torch."""
