"""Open an llmctl checkpoint with transformers and compare its logits and greedy text with llmctl's."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import transformers

from llmctl.checkpoint import open_checkpoint
from llmctl.infer.generate import generate_ids
from llmctl.infer.sampling import SamplingParams


def main(checkpoint: Path) -> None:
    ours, tokenizer = open_checkpoint(checkpoint)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    prompt = tokenizer.encode("The Python tutorial")
    ids = torch.tensor([prompt])
    with torch.no_grad():
        difference = (ours(ids) - theirs(ids).logits).abs().max().item()
    greedy = SamplingParams(max_new_tokens=24, temperature=0.0)
    ours_ids = list(generate_ids(ours, prompt, greedy))
    theirs_ids = theirs.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=None)[
        0, len(prompt) :
    ].tolist()
    print(
        f"transformers opened {checkpoint}: {type(theirs).__name__}, max |logit difference| {difference:.2e}"
    )
    print(f"greedy continuation, llmctl:       {tokenizer.decode(prompt + ours_ids)!r}")
    print(f"greedy continuation, transformers: {tokenizer.decode(prompt + theirs_ids)!r}")
    if difference > 1e-4 or ours_ids != theirs_ids:
        sys.exit("llmctl and transformers disagree on this checkpoint")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
