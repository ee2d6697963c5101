"""Thin Typer front-ends: parse, validate, call an engine, print. Heavy imports stay inside functions."""
