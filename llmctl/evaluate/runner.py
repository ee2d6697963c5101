"""Running an evaluation (a suite, lm-eval tasks or a perplexity set) and recording every number with its
configuration, so two result files can be compared later."""

from __future__ import annotations

import time
from pathlib import Path

from llmctl import __version__
from llmctl.data.corpus import MANIFEST, iter_texts
from llmctl.data.jsonl import read_jsonl, string_field
from llmctl.digests import file_sha256
from llmctl.errors import UserError
from llmctl.evaluate.perplexity import perplexity
from llmctl.evaluate.suite import Suite, Task, domain_suite_for, load_suite
from llmctl.evaluate.text_metrics import generation_metrics
from llmctl.infer.decode import load_for_inference
from llmctl.infer.generate import generate_batch, without_stop_ids
from llmctl.infer.sampling import SamplingParams
from llmctl.model.hf_format import WEIGHTS_FILE


def read_texts(data: Path, split: str = "val") -> list[str]:
    """A corpus directory (its `split`, else the other one), a JSONL file with a `text` field, or a text
    file. Evaluation reads a corpus's val split; calibration its train split."""
    data = Path(data)
    if (data / MANIFEST).is_file():
        other = "train" if split == "val" else "val"
        return list(iter_texts(data, split)) or list(iter_texts(data, other))
    if data.is_dir():
        raise UserError(f"{data} is a folder but not a corpus (no {MANIFEST}); give a corpus, .jsonl or .txt")
    if not data.is_file():
        raise UserError(f"evaluation data not found: {data}")
    if data.suffix == ".jsonl":
        return [string_field(location, record, "text") for location, record in read_jsonl(data)]
    try:
        return [data.read_text(encoding="utf-8")]
    except UnicodeDecodeError as error:
        raise UserError(
            f"{data} is not UTF-8 text (byte {error.start}); convert it or pass another file"
        ) from None


class Evaluator:
    def __init__(self, checkpoint: Path, seed: int = 0, adapter: Path | None = None) -> None:
        self.checkpoint, self.adapter = Path(checkpoint), adapter
        self.model, self.tokenizer = load_for_inference(self.checkpoint, adapter)
        self.seed = seed

    def perplexity(self, data: Path, window: int | None = None, stride: int | None = None) -> dict:
        return perplexity(
            self.model, self.tokenizer, read_texts(data), window, stride, seed=self.seed
        ).to_dict()

    def generation(self, data: Path, max_tokens: int) -> dict:
        if not Path(data).is_file():
            raise UserError(f"generation data not found: {data}")
        rows = [
            (string_field(location, record, "prompt"), string_field(location, record, "reference"))
            for location, record in read_jsonl(Path(data))
        ]
        if not rows:
            raise UserError(f"{data} has no generation examples")
        prompts = [self.tokenizer.encode(prompt) for prompt, _ in rows]
        params = SamplingParams(
            max_new_tokens=max_tokens, temperature=0.0, stop_token_ids=(self.tokenizer.eos_id,)
        )
        outputs = generate_batch(self.model, prompts, params, pad_id=self.tokenizer.pad_id)
        predictions = []
        for prompt, ids in zip(prompts, outputs, strict=True):
            ids = without_stop_ids(ids, params.stop_token_ids)
            text = self.tokenizer.decode(prompt + ids)[len(self.tokenizer.decode(prompt)) :]
            predictions.append(text.strip().split("\n")[0])
        return {
            "examples": len(rows),
            **generation_metrics(predictions, [reference for _, reference in rows]),
        }

    def lm_eval(self, tasks: list[str], include_path: Path | None, limit: int | None) -> dict:
        try:
            from llmctl.evaluate.lm_eval_adapter import simple_evaluate
        except ImportError as error:
            raise UserError(
                f"lm-eval tasks need the eval extra ({error.name} is missing): pip install 'llmctl[eval]'"
            ) from None
        try:
            output = simple_evaluate(self.checkpoint, tasks, include_path, limit, self.seed, self.adapter)
        except KeyError as error:
            raise UserError(
                f"unknown lm-eval task {error}; check the name or pass --include-path DIR"
            ) from None
        results = {}
        for task, metrics in output["results"].items():
            results[task] = {
                key.split(",")[0]: value
                for key, value in metrics.items()
                if isinstance(value, int | float) and "stderr" not in key
            }
        return results

    def run_task(self, task: Task) -> dict:
        if task.type == "perplexity":
            return self.perplexity(Path(task.data))
        if task.type == "generation":
            return self.generation(Path(task.data), task.max_tokens)
        return self.lm_eval(task.tasks, Path(task.include_path) if task.include_path else None, task.limit)

    def run_suite(self, suite: Suite) -> dict:
        return {task.name: self.run_task(task) for task in suite.tasks}

    def evaluate(
        self,
        data: Path | None = None,
        suite: str | None = None,
        tasks: list[str] | None = None,
        include_path: Path | None = None,
        limit: int | None = None,
        window: int | None = None,
        stride: int | None = None,
    ) -> dict:
        """What `llmctl eval` asks for, as one results record: a suite ("domain": the checkpoint's corpus's,
        built once) or perplexity on `data`, and lm-eval `tasks`."""
        results: dict = {}
        if suite:
            suite_file = domain_suite_for(self.checkpoint, data) if suite == "domain" else Path(suite)
            results.update(self.run_suite(load_suite(suite_file)))
        elif data:
            results["perplexity"] = self.perplexity(data, window, stride)
        if tasks:
            results.update(self.lm_eval(tasks, include_path, limit))
        config = {
            "data": str(data) if data else None,
            "tasks": ",".join(tasks) if tasks else None,
            "window": window,
            "stride": stride,
            "limit": limit,
        }
        return self.record(results, suite, config)

    def record(self, results: dict, suite: str | None, config: dict) -> dict:
        return {
            "llmctl_version": __version__,
            "checkpoint": str(self.checkpoint),
            "adapter": str(self.adapter) if self.adapter else None,
            "checkpoint_sha256": file_sha256(self.checkpoint / WEIGHTS_FILE)
            if (self.checkpoint / WEIGHTS_FILE).is_file()
            else None,
            "suite": suite,
            "seed": self.seed,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "config": config,
            "results": results,
        }
