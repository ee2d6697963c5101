#!/usr/bin/env bash
# `make demo`: the whole pipeline on the bundled sample corpus, everything under $1 (default runs/demo).
set -euo pipefail
DEMO=${1:-runs/demo}
BIN=${BIN:-.venv/bin}
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "1/10 corpus build: clean, filter, dedup and split the bundled sample"
$BIN/llmctl corpus build data/sample/train.jsonl data/sample/val.jsonl --out "$DEMO/corpus" --val-fraction 0.1 --overwrite
$BIN/llmctl corpus stats "$DEMO/corpus"

step "2/10 tokenize: a 4096-piece sentencepiece model, then memory-mapped token files"
$BIN/llmctl tokenize train "$DEMO/corpus" --vocab 4096 --out "$DEMO/tokenizer" --overwrite
$BIN/llmctl tokenize encode "$DEMO/corpus" --tokenizer "$DEMO/tokenizer/tokenizer.model" --out "$DEMO/tokens" --overwrite

step "3/10 train recipes/tiny.toml (about a minute on 2 CPU cores)"
$BIN/llmctl train recipes/tiny.toml --set checkpoint.dir="$DEMO/tiny" \
  --set data.corpus="$DEMO/corpus" --set data.tokens="$DEMO/tokens" --set data.tokenizer="$DEMO/tokenizer/tokenizer.model" \
  --overwrite

CKPT=$(ls -d "$DEMO"/tiny/checkpoints/step-* | sort | tail -n 1)
step "4/10 the checkpoint is a Hugging Face Llama directory: open it with transformers"
$BIN/python scripts/open_with_transformers.py "$CKPT" | tee "$DEMO/transformers_check.txt"

step "5/10 generate: one chat turn through the plain REPL (the tiny model is not chat-tuned: expect domain babble)"
echo "How do I open a file?" | $BIN/llmctl chat "$CKPT" --plain --max-tokens 40 | tee "$DEMO/chat.txt"

step "6/10 eval --suite domain: held-out perplexity, cloze multiple choice, heading -> first sentence (BLEU/ROUGE)"
$BIN/llmctl eval "$CKPT" --suite domain --out "$DEMO/eval.json" --overwrite

step "7/10 finetune recipes/lora.toml: LoRA on heading -> paragraph instructions made from the corpus"
$BIN/llmctl corpus instructions "$DEMO/corpus" --out "$DEMO/instructions.jsonl" --limit 400 --overwrite
$BIN/llmctl finetune recipes/lora.toml --set finetune.base="$DEMO/tiny" --set finetune.examples="$DEMO/instructions.jsonl" \
  --set checkpoint.dir="$DEMO/lora" --overwrite
ADAPTER=$(ls -d "$DEMO"/lora/checkpoints/step-* | sort | tail -n 1)

step "8/10 chat with the adapter: one turn, rendered with the chat template it was trained on"
echo "Explain: Reading and Writing Files" | $BIN/llmctl chat "$CKPT" --adapter "$ADAPTER" --plain --max-tokens 40 \
  | tee "$DEMO/chat_lora.txt"

step "9/10 report: the run's curves as PNG files and one HTML page to share"
$BIN/llmctl report "$DEMO/tiny" --eval "$DEMO/eval.json" --out "$DEMO/report" --overwrite

step "10/10 done"
echo "corpus:     $DEMO/corpus"
echo "tokenizer:  $DEMO/tokenizer/tokenizer.model"
echo "tokens:     $DEMO/tokens"
echo "run:        $DEMO/tiny (metrics.jsonl, train.log, checkpoints/)"
echo "checkpoint: $CKPT"
echo "eval:       $DEMO/eval.json (compare runs with: llmctl eval compare A.json B.json)"
echo "report:     $DEMO/report/report.html (watch a run live with: llmctl monitor $DEMO/tiny)"
echo "adapter:    $ADAPTER (PEFT format; merge with: llmctl finetune merge $ADAPTER --out DIR)"
