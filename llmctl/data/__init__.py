"""The data engine: documents -> clean corpus -> sentencepiece tokenizer -> token shards -> training windows."""
