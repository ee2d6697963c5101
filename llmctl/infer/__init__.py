"""Inference: the one prefill/decode path, sampling, beam search, the continuous-batching engine, chat sessions
and the OpenAI-compatible server.

Knows the model, checkpoints and the tokenizer. Never imports the CLI (Typer, Rich), the trainer or evaluation.
"""
