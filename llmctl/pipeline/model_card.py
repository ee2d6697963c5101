"""The model card `llmctl up` writes as README.md in the checkpoint it delivers, in the Hugging Face format: a
YAML metadata header, then what the model was made from, how, how it measures, and what it is not for."""

from __future__ import annotations

from dataclasses import dataclass

import yaml


@dataclass(frozen=True)
class CardFacts:
    name: str
    documents: str  # where the text came from
    corpus: dict  # the corpus manifest's counts
    training: dict[str, str]  # setting -> value, in the order shown
    evaluation: list[tuple[str, dict]]  # (which model, perplexity result)
    base: str | None = None
    served: str = "float32"


def metadata(facts: CardFacts) -> dict:
    """The card's YAML header: what the Hub indexes, the held-out figures as a model-index entry."""
    return {
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["llmctl", "domain-adapted" if facts.base else "from-scratch"],
        **({"base_model": facts.base} if facts.base else {}),
        "model-index": [
            {
                "name": facts.name,
                "results": [
                    {
                        "task": {"type": "text-generation"},
                        "dataset": {"type": "held-out", "name": "held-out split of the documents"},
                        "metrics": [
                            {"type": "perplexity", "value": round(result["token_perplexity"], 4)},
                            {"type": "bits_per_byte", "value": round(result["bits_per_byte"], 4)},
                        ],
                    }
                    for _, result in facts.evaluation[-1:]
                ],
            }
        ],
    }


def model_card(facts: CardFacts) -> str:
    rows = "\n".join(
        f"| {label} | {result['token_perplexity']:.3f} | {result['bits_per_byte']:.4f} | {result['documents']:,} |"
        for label, result in facts.evaluation
    )
    settings = "\n".join(f"| {key} | {value} |" for key, value in facts.training.items())
    corpus = facts.corpus
    splits = corpus["splits"]
    licence = "- The base model's licence and its own limits apply to this model too.\n" if facts.base else ""
    origin = f"adapted from `{facts.base}`" if facts.base else "trained from scratch"
    return f"""---
{yaml.safe_dump(metadata(facts), sort_keys=False).strip()}
---

# {facts.name}

A language model of one organisation's documents, {origin} by `llmctl up`.

## Data

- Documents: `{facts.documents}`
- Kept after cleaning, filtering and de-duplication: {splits["train"]["documents"]:,} training and \
{splits["val"]["documents"]:,} held-out documents, of {corpus["documents_read"]:,} read
- The held-out documents were never trained on; every figure below is measured on them.

## Training

| setting | value |
|---|---|
{settings}

## Evaluation

Held-out perplexity (per token) and bits per byte (comparable across tokenizers; lower is better):

| model | perplexity | bits per byte | documents |
|---|---|---|---|
{rows}

Served weights: {facts.served}.

## Intended use

Completing and answering questions about text like the documents it was made from, inside the organisation
that owns them: drafting, search over its own terms, and chat through `llmctl chat` or `llmctl serve`.

## Limitations

- It knows only what its documents say (and, adapted, what its base knew); it states wrong things fluently.
- A small model trained in minutes: check its answers before relying on them.
- It may repeat text from its documents, personal data included unless the corpus was scrubbed.
{licence}
## How to use

```
llmctl chat {facts.name}@latest
llmctl serve {facts.name}@latest
```
"""
