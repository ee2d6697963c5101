"""llmctl checkpoints as an lm-evaluation-harness model type (`--model llmctl`), so any lm-eval task,
including local YAML tasks, runs on them offline."""

from __future__ import annotations

from pathlib import Path

import lm_eval.models  # noqa: F401  (lm-eval fills its registry lazily, and only while it is empty)
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from llmctl.evaluate.scoring import batched_continuation_logprobs
from llmctl.infer.decode import load_for_inference
from llmctl.infer.generate import generate_batch, without_stop_ids
from llmctl.infer.sampling import SamplingParams
from llmctl.infer.text import StopStrings


@register_model("llmctl")
class LlmctlLM(TemplateLM):
    """Tokenizes as the checkpoint's Hugging Face tokenizer does by default (a bos in front for Llama's, none
    for Qwen's), so scores match lm-eval's own `hf` model type on the same directory. `add_bos_token=False`
    encodes without special tokens, as lm-eval's `local-completions` does through a server's /tokenize."""

    def __init__(
        self,
        pretrained: str,
        adapter: str | None = None,
        batch_size: int | str = 8,
        max_gen_toks: int = 64,
        add_bos_token: bool | str = True,
        **kwargs,
    ) -> None:
        super().__init__()
        self.add_bos_token = str(add_bos_token).lower() not in ("false", "0")
        self.model, self.tokenizer = load_for_inference(Path(pretrained), Path(adapter) if adapter else None)
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
        self.max_gen_toks = int(max_gen_toks)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.bos_id

    @property
    def max_length(self) -> int:
        return self.model.config.max_seq_len

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        if add_special_tokens is False or not self.add_bos_token:
            return self.tokenizer.encode(string)
        return self.tokenizer.encode_with_specials(string)

    def tok_decode(self, tokens: list[int], **kwargs) -> str:
        return self.tokenizer.decode(tokens)

    def _loglikelihood_tokens(
        self, requests, disable_tqdm: bool = False, **kwargs
    ) -> list[tuple[float, bool]]:
        """Scored `batch_size` requests per forward, longest first, as lm-eval's `hf` model does."""
        items = []
        for _, context_enc, continuation_enc in requests:
            whole = (context_enc + continuation_enc)[-(self.max_length + 1) :]
            items.append((whole, len(whole) - len(continuation_enc)))
        scored = batched_continuation_logprobs(self.model, items, self.batch_size)
        return [(float(log_probs.double().sum()), bool(greedy.all())) for log_probs, greedy in scored]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Every window of every request in one batched pass; each request's score is its windows' sum."""
        pairs, owners = [], []
        for owner, request in enumerate(requests):
            (text,) = request.args
            windows = get_rolling_token_windows(
                token_list=self.tok_encode(text, add_special_tokens=False),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            for window in windows:
                pairs.append((None, *make_disjoint_window(window)))
                owners.append(owner)
        scores = [0.0] * len(requests)
        for owner, (score, _) in zip(owners, self._loglikelihood_tokens(pairs), strict=True):
            scores[owner] += score
        return scores

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        outputs = []
        for start in range(0, len(requests), self.batch_size):
            batch = requests[start : start + self.batch_size]
            prompts, settings = zip(*(request.args for request in batch), strict=True)
            kwargs = settings[0]
            until = kwargs.get("until", [])
            until = [until] if isinstance(until, str) else list(until)
            budget = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            params = SamplingParams(
                max_new_tokens=budget,
                temperature=float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0,
                stop_token_ids=(self.tokenizer.eos_id,),
            )
            room = self.max_length - budget
            encoded = [self.tok_encode(prompt)[-room:] for prompt in prompts]
            for ids in generate_batch(self.model, encoded, params, pad_id=self.tokenizer.pad_id):
                text = self.tokenizer.decode(without_stop_ids(ids, params.stop_token_ids))
                text, _ = StopStrings(until).feed(text)
                outputs.append(text)
        return outputs


def simple_evaluate(
    checkpoint: Path,
    tasks: list[str],
    include_path: Path | None,
    limit: int | None,
    seed: int,
    adapter: Path | None = None,
) -> dict:
    """Run lm-eval tasks on a checkpoint; only locally defined tasks are indexed when include_path is given."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = (
        TaskManager(include_path=str(include_path), include_defaults=False) if include_path else TaskManager()
    )
    with torch.inference_mode():
        return lm_eval.simple_evaluate(
            model="llmctl",
            model_args=f"pretrained={checkpoint}" + (f",adapter={adapter}" if adapter else ""),
            tasks=tasks,
            task_manager=manager,
            limit=limit,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
            log_samples=False,
        )
