"""What every quantize / prune / export run ends with: for each artefact, its size on disk, held-out
perplexity (and its change against the source) and batch-1 greedy decode speed on this machine."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from llmctl.data.tokenizer_base import Tokenizer
from llmctl.evaluate.perplexity import perplexity
from llmctl.infer.generate import generate_ids
from llmctl.infer.sampling import SamplingParams
from llmctl.model import Transformer

DECODE_TOKENS = 64
DECODE_PROMPT = list(range(3, 19))  # 16 tokens, the same for every runtime measured
WEIGHT_FILES = ("*.safetensors", "*.onnx", "*.onnx.data")


@dataclass
class ArtefactReport:
    label: str
    path: Path
    size_bytes: int
    perplexity: float | None = None
    decode_tokens_per_second: float | None = None
    note: str = ""  # why a figure is missing, or what else a reader must know

    def change_against(self, source: ArtefactReport) -> float | None:
        """Relative perplexity change, e.g. 0.012 for +1.2%."""
        if self.perplexity is None or source.perplexity is None:
            return None
        return self.perplexity / source.perplexity - 1


def weights_size(path: Path) -> int:
    """Bytes of a checkpoint's weight files (an ONNX export's graph and weights), or of a single file."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(file.stat().st_size for pattern in WEIGHT_FILES for file in path.glob(pattern))


def heldout_texts(texts: list[str], tokens: int) -> list[str]:
    """Leading documents of the held-out set up to about `tokens` tokens (4 characters a token), so that
    measuring several artefacts stays quick on a large validation split; a long document is cut."""
    kept, budget = [], tokens * 4
    for text in texts:
        if budget <= 0:
            break
        kept.append(text[:budget])
        budget -= len(text)
    return kept


def best_tokens_per_second(decode: Callable[[], int], repeats: int = 2) -> float:
    """Tokens/s of the fastest of `repeats` + 1 runs of `decode`, which returns how many tokens it produced:
    the first run warms caches and kernels up, so it rarely counts. Every runtime in the table is timed so."""
    best = math.inf
    for _ in range(repeats + 1):
        started = time.perf_counter()
        produced = decode()
        best = min(best, (time.perf_counter() - started) / produced)
    return 1 / best


def decode_tokens_per_second(model: Transformer, tokens: int = DECODE_TOKENS, repeats: int = 2) -> float:
    """Batch-1 greedy decoding of `tokens` new tokens after DECODE_PROMPT."""
    params = SamplingParams(max_new_tokens=tokens, temperature=0.0)
    return best_tokens_per_second(lambda: sum(1 for _ in generate_ids(model, DECODE_PROMPT, params)), repeats)


def measure_model(
    label: str,
    path: Path,
    model: Transformer,
    tokenizer: Tokenizer,
    texts: list[str],
    progress: Callable[[str], None] = lambda message: None,
    decode: bool = True,
) -> ArtefactReport:
    """Size, held-out perplexity (none without `texts`: --heldout was not given) and decode speed."""
    scored = f"held-out perplexity on {len(texts)} documents" if texts else "no held-out text"
    progress(f"measuring {label}: {scored}" + (", decode speed" * decode))
    return ArtefactReport(
        label=label,
        path=Path(path),
        size_bytes=weights_size(path),
        perplexity=perplexity(model, tokenizer, texts).token_perplexity if texts else None,
        decode_tokens_per_second=decode_tokens_per_second(model) if decode else None,
        note="" if texts else "no --heldout",
    )
