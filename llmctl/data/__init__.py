"""The data engine: documents -> clean corpus -> sentencepiece tokenizer -> token files -> training windows.

Knows files, text and token ids. Imports no model and no engine: only `loader` touches torch (it hands the
trainer tensors); corpus building imports neither torch nor the recipe, so it runs in lightweight workers.
"""
