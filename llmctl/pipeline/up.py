"""`llmctl up DOCS`: a folder of documents to an evaluated, registered domain model within a time budget,
composed from the engine functions the single commands call. Each stage's output is keyed by a digest of its
inputs and settings (`ledger.py`), so a re-run redoes only what changed and a stopped training run resumes."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from llmctl.atomic import atomic_write_text
from llmctl.checkpoint import checkpoint_problem, latest_checkpoint
from llmctl.data.corpus import build_corpus, iter_texts, read_manifest
from llmctl.data.sources import expand_sources
from llmctl.digests import write_digest_manifest
from llmctl.errors import UserError
from llmctl.model.hf_format import CONFIG_FILE
from llmctl.pipeline import budget
from llmctl.pipeline.budget import PlannedStage
from llmctl.pipeline.ledger import Ledger, documents_digest, settings_key
from llmctl.pipeline.model_card import CardFacts, model_card
from llmctl.pipeline.settings import UpSettings
from llmctl.pipeline.sizing import MAX_EPOCHS, MICRO_BATCH, ShapeChoice, choose_shape, vocabulary_size
from llmctl.recipe import Recipe, deep_merge, recipe_from_dict

CARD_FILE = "README.md"
HELDOUT_DOCUMENTS = 200  # quantization's perplexity check
MAX_QUANTIZATION_COST = 0.01  # int8 is served when faster and at most 1% worse in held-out perplexity
ADAPT_CONTEXT = 512  # continued pretraining windows on a CPU, whatever the base's context


@dataclass(frozen=True)
class UpRequest:
    docs: Path
    out: Path
    budget_seconds: float
    name: str
    base: Path | None = (
        None  # a model directory or a GGUF file; registry references are resolved by the caller
    )
    base_label: str | None = None  # how the user named the base, for the model card
    settings: UpSettings = UpSettings()


@dataclass(frozen=True)
class StageStarted:
    name: str
    what: str


@dataclass(frozen=True)
class StageDone:
    name: str
    seconds: float
    summary: str
    reused: bool


@dataclass
class UpResult:
    model: Path
    registered: str | None
    card: Path
    report: Path | None
    evaluation: list[tuple[str, dict]]
    stages: list[StageDone] = field(default_factory=list)


class TrainingInterrupted(Exception):
    """A signal stopped a training stage after its checkpoint; running `llmctl up` again resumes it."""


Event = Callable[[object], None]


class UpPipeline:
    def __init__(self, request: UpRequest, on_event: Event, on_training_event: Event) -> None:
        self.request, self.settings = request, request.settings
        self.on_event, self.on_training_event = on_event, on_training_event
        self.out = Path(request.out)
        self.started = time.perf_counter()  # the budget counts from here: checks and plan included
        self.documents, self.document_bytes = check_request(request)
        self.flops_per_second = 0.0
        self.keys: dict[str, str] = {}
        self.model_key = "from scratch"  # the key of the stage that made the current model
        self.chat_seconds = 0.0
        self.recipe: dict = {}  # the training recipe, once settled
        self.done: list[StageDone] = []

    # -- the plan -------------------------------------------------------------------------------------------

    def plan(self) -> list[PlannedStage]:
        """Every stage with its estimated seconds and disk, training taking what the others leave; refused
        when the budget leaves less than MIN_TRAIN_SECONDS to train (before measuring, when the data stages
        alone leave too little)."""
        from llmctl.pipeline.sizing import measured_flops_per_second

        data = budget.data_stage_seconds(self.document_bytes, tokenizer=self.request.base is None)
        self._check_budget({**data, "register": budget.REGISTER_SECONDS})
        vocab = self._vocabulary(self.document_bytes)
        self.flops_per_second = measured_flops_per_second(vocab)
        heldout = int(self.document_bytes * self.settings.corpus_options().val_fraction)
        parameters = self._estimated_parameters(vocab, sum(data.values()))
        evaluations = 1 if self.request.base is None else 2
        after = {
            "evaluate": evaluations * budget.evaluation_seconds(heldout, parameters, self.flops_per_second),
            "quantize": budget.quantize_seconds(heldout, parameters, self.flops_per_second)
            if self.settings.quantize
            else 0.0,
            "register": budget.REGISTER_SECONDS,
        }
        train_seconds = self._check_budget({**data, **after})
        chat = self.settings.chat
        train, chat_seconds = budget.training_split(
            train_seconds, chat.share if chat.enabled else 0.0, 60 * chat.min_minutes
        )
        return self._plan_rows(data, after, train, chat_seconds, parameters)

    def _check_budget(self, other_stages: dict[str, float]) -> float:
        """The seconds the budget leaves to train after `other_stages`, or one line saying it is too small."""
        others = sum(other_stages.values()) + time.perf_counter() - self.started
        train_seconds = self.request.budget_seconds - others
        if train_seconds < budget.MIN_TRAIN_SECONDS:
            needed = (others + budget.MIN_TRAIN_SECONDS) / 60
            raise UserError(
                f"--budget {self.request.budget_seconds / 60:g}m leaves {max(train_seconds, 0):.0f}s to train "
                f"after the other stages; give at least --budget {needed:.1f}m"
            )
        return train_seconds

    def _plan_rows(
        self, data: dict, after: dict, train: float, chat: float, parameters: int
    ) -> list[PlannedStage]:
        text = self.document_bytes
        rows = [
            PlannedStage(
                "corpus", "clean, filter, de-duplicate and split the documents", data["corpus"], text
            ),
        ]
        if "tokenizer" in data:
            rows.append(
                PlannedStage(
                    "tokenizer", "a sentencepiece vocabulary sized for the corpus", data["tokenizer"], 1 << 20
                )
            )
        rows.append(PlannedStage("tokens", "encode both splits", data["tokens"], text // 2))
        if self.request.base is None:
            rows.append(
                PlannedStage("train", "pretrain the shape the time allows", train, 36 * parameters, True)
            )
        else:
            rows.append(
                PlannedStage(
                    "adapt", "continued pretraining of the base with LoRA", train, 12 * parameters, True
                )
            )
        if chat:
            rows.append(
                PlannedStage(
                    "chat", "LoRA on starter instructions made from the corpus", chat, 4 * parameters, True
                )
            )
        rows.append(
            PlannedStage("evaluate", "held-out perplexity and bits per byte", after["evaluate"], 1 << 20)
        )
        if after["quantize"]:
            rows.append(
                PlannedStage(
                    "quantize", "int8, kept when faster at <= 1% perplexity", after["quantize"], parameters
                )
            )
        rows.append(
            PlannedStage("register", "model card, registry version, report", after["register"], 1 << 20)
        )
        return rows

    def _vocabulary(self, text_bytes: int) -> int:
        return int(self.settings.tokenizer.get("vocab_size", vocabulary_size(text_bytes)))

    def _estimated_parameters(self, vocab: int, data_seconds: float) -> int:
        if self.request.base is not None:
            return _base_parameters(self.request.base)
        seconds = max(self.request.budget_seconds * 0.8 - data_seconds, 1.0)
        tokens = self.document_bytes // budget.BYTES_PER_TOKEN
        return choose_shape(vocab, seconds, tokens, self.flops_per_second).parameters

    # -- running ---------------------------------------------------------------------------------------------

    def run(self, planned: list[PlannedStage]) -> UpResult:
        """Every stage in order, reusing those whose inputs are unchanged."""
        from llmctl.train.distributed import init_distributed, shutdown_distributed

        self.planned = {stage.name: stage for stage in planned}
        self.out.mkdir(parents=True, exist_ok=True)
        self.ledger = Ledger(self.out)
        self.context = init_distributed("auto", "auto")
        try:
            return self._run()
        finally:
            shutdown_distributed()

    def _run(self) -> UpResult:
        base = self._import_base()
        corpus = self._corpus()
        tokenizer = self._tokenizer(corpus) if base is None else base
        tokens = self._tokens(corpus, tokenizer)
        evaluation = []
        if base is not None:
            self.model_key = self.keys.get("import") or str(base)
            evaluation.append(("base", self._evaluate("evaluate-base", base, corpus)))
            trained = self._adapt(base, tokens, corpus)
        else:
            trained = self._pretrain(corpus, tokenizer, tokens)
        final = self._chat(trained, corpus)
        evaluation.append(("adapted" if base else "trained", self._evaluate("evaluate", final, corpus)))
        served = self._quantize(final, corpus)
        model = self._deliver(served, corpus, evaluation)
        return UpResult(
            model, self._register(model), model / CARD_FILE, self._report(), evaluation, self.done
        )

    def _stage(self, name: str, what: str, inputs: tuple, action: Callable[[bool], dict]) -> dict:
        """Run one stage, or reuse it when it finished with the same key; `action(again)` is told whether an
        earlier attempt with this key was interrupted (a training run resumes from its checkpoint)."""
        key = settings_key(name, *inputs)
        self.keys[name] = key
        record = self.ledger.done(name, key)
        if record is not None:
            self._finished(StageDone(name, record.seconds, record.result.get("summary", ""), reused=True))
            return record.result
        self.on_event(StageStarted(name, what))
        again = self.ledger.started_with(name, key)
        self.ledger.start(name, key)
        started = time.perf_counter()
        result = action(again)
        seconds = time.perf_counter() - started
        self.ledger.finish(name, seconds, result)
        self._finished(StageDone(name, seconds, result.get("summary", ""), reused=False))
        return result

    def _finished(self, done: StageDone) -> None:
        self.done.append(done)
        self.on_event(done)

    def _model_stage(self, name: str, what: str, inputs: tuple, action: Callable[[bool], dict]) -> dict:
        """A stage that makes a new model from the current one: its key follows the current model's, and
        becomes it."""
        result = self._stage(name, what, (self.model_key, *inputs), action)
        self.model_key = self.keys[name]
        return result

    # -- the data --------------------------------------------------------------------------------------------

    def _import_base(self) -> Path | None:
        base = self.request.base
        if not _is_gguf(base):
            return base
        from llmctl.compress.gguf_import import import_gguf
        from llmctl.digests import file_sha256

        out = self.out / "base"

        def convert(again: bool) -> dict:
            shutil.rmtree(out, ignore_errors=True)
            import_gguf(base, out)
            return {"summary": f"{base.name} -> {out}"}

        self._stage("import", "turn the GGUF file into a checkpoint", (file_sha256(base),), convert)
        return out

    def _corpus(self) -> Path:
        out = self.out / "corpus"
        options = self.settings.corpus_options()

        def build(again: bool) -> dict:
            manifest = build_corpus([str(self.request.docs)], out, options, overwrite=True)
            train, val = (manifest["splits"][split]["documents"] for split in ("train", "val"))
            if not train:
                raise UserError(
                    f"no document of {self.request.docs} kept any text after cleaning and filtering"
                )
            return {"summary": f"{train:,} training and {val:,} held-out documents"}

        inputs = (documents_digest(self.documents, Path(self.request.docs)), repr(options))
        self._stage("corpus", "clean, filter, de-duplicate and split", inputs, build)
        return out

    def _tokenizer(self, corpus: Path) -> Path:
        from llmctl.data.tokenizer import train_tokenizer

        out = self.out / "tokenizer"
        vocab = self._vocabulary(_corpus_bytes(corpus))
        model_type = self.settings.tokenizer.get("model_type", "bpe")

        def train(again: bool) -> dict:
            report = train_tokenizer(corpus, out, vocab, model_type=model_type, overwrite=True)
            return {"summary": f"{report['vocab_size']:,} pieces, {report['fertility']:.2f} tokens per word"}

        self._stage("tokenizer", "train the vocabulary", (self.keys["corpus"], vocab, model_type), train)
        return out / "tokenizer.model"

    def _tokens(self, corpus: Path, tokenizer: Path) -> Path:
        from llmctl.data.token_files import encode_corpus

        out = self.out / "tokens"
        upstream = self.keys.get("tokenizer") or self.keys.get("import") or str(tokenizer)

        def encode(again: bool) -> dict:
            meta = encode_corpus(corpus, tokenizer, out, overwrite=True)
            counts = meta["tokens"]
            return {"summary": f"{counts['train']:,} training and {counts['val']:,} held-out tokens"}

        self._stage("tokens", "encode both splits", (self.keys["corpus"], upstream), encode)
        return out

    # -- training --------------------------------------------------------------------------------------------

    def _split_seconds(self) -> tuple[float, float]:
        """(training, chat finetuning) seconds: what the budget leaves now that the data stages are done,
        less the planned seconds of the stages after training."""
        spent = time.perf_counter() - self.started
        later = sum(stage.seconds for stage in self.planned.values() if not stage.training) - sum(
            stage.seconds
            for stage in self.planned.values()
            if stage.name in ("corpus", "tokenizer", "tokens")
        )
        left = max(self.request.budget_seconds - spent - later, budget.MIN_TRAIN_SECONDS)
        chat = self.settings.chat
        return budget.training_split(left, chat.share if chat.enabled else 0.0, 60 * chat.min_minutes)

    def _settle(self, make_recipe: Callable[[float], tuple[Recipe, str]]) -> Recipe:
        """The training recipe for the time left, settled once: a re-run reuses it, so an interrupted run
        resumes the same recipe."""

        def settle(again: bool) -> dict:
            train_seconds, chat_seconds = self._split_seconds()
            recipe, summary = make_recipe(train_seconds)
            return {"recipe": recipe.to_toml(), "chat_seconds": chat_seconds, "summary": summary}

        inputs = (self.keys["tokens"], self.request.budget_seconds, self.settings.as_key())
        settled = self._model_stage("size", "settle the model and its training time", inputs, settle)
        self.chat_seconds = settled["chat_seconds"]
        self.recipe = _toml(settled["recipe"])
        return recipe_from_dict(self.recipe, source="llmctl up")

    def _pretrain(self, corpus: Path, tokenizer: Path, tokens: Path) -> Path:
        from llmctl.data.token_files import read_meta

        def make_recipe(seconds: float) -> tuple[Recipe, str]:
            train_tokens = read_meta(tokens)["tokens"]["train"]
            vocab = _tokenizer_size(tokenizer)
            choice = choose_shape(vocab, seconds, train_tokens, self.flops_per_second)
            seq = choice.shape.max_seq_len
            step_tokens = MICRO_BATCH * seq
            every = _checkpoint_every(choice.tokens_per_second, step_tokens)
            raw = {
                "name": self.request.name,
                "model": choice.shape.model_settings(vocab),
                "data": {"corpus": str(corpus), "tokens": str(tokens), "tokenizer": str(tokenizer)},
                "train": {
                    "steps": max(1, MAX_EPOCHS * train_tokens // step_tokens),
                    "max_minutes": seconds / 60,
                    "micro_batch_size": MICRO_BATCH,
                    "global_batch_size": MICRO_BATCH,
                    "eval_every": every,
                    "eval_batches": 10,
                },
                "checkpoint": {"dir": str(self.out / "train"), "every": every, "keep_last": 2},
            }
            recipe = recipe_from_dict(deep_merge(raw, self.settings.recipe), source="llmctl up --set")
            return recipe, _shape_summary(choice, seconds)

        recipe = self._settle(make_recipe)
        result = self._model_stage("train", "pretrain", (), lambda again: self._fit(recipe, again))
        return Path(result["checkpoint"])

    def _adapt(self, base: Path, tokens: Path, corpus: Path) -> Path:
        def make_recipe(seconds: float) -> tuple[Recipe, str]:
            raw = {
                "name": self.request.name,
                "finetune": {"base": str(base), "method": "lora"},
                "data": {"corpus": str(corpus), "tokens": str(tokens)},
                "train": {
                    "steps": 1_000_000,
                    "max_minutes": seconds / 60,
                    "seq_len": min(ADAPT_CONTEXT, _base_context(base)),
                    "micro_batch_size": 4,
                    "global_batch_size": 8,
                    "eval_every": 0,
                    "eval_batches": 5,
                },
                "checkpoint": {"dir": str(self.out / "adapt"), "every": 20, "keep_last": 1},
            }
            return _finetune_recipe(deep_merge(raw, self.settings.recipe)), f"LoRA, {seconds / 60:.1f} min"

        recipe = self._settle(make_recipe)
        adapter = self._model_stage(
            "adapt", "continued pretraining with LoRA", (), lambda again: self._fit(recipe, again)
        )
        return self._merge_adapter(Path(adapter["checkpoint"]), self.out / "adapted")

    def _chat(self, model: Path, corpus: Path) -> Path:
        """A short LoRA finetune on starter instructions made from the corpus, when the budget left time for
        it and the corpus has headed sections to make them from; the model as it was otherwise."""
        from llmctl.data.instructions import section_examples, write_starter_set

        if not self.chat_seconds:
            return model
        if not section_examples(list(iter_texts(corpus, "train"))):
            self._finished(
                StageDone("chat", 0.0, "skipped: no headed sections to make instructions from", False)
            )
            return model
        examples = self.out / "instructions.jsonl"

        def finetune(again: bool) -> dict:
            count = write_starter_set(corpus, examples, limit=self.settings.chat.examples, overwrite=True)
            raw = {
                "name": f"{self.request.name}-chat",
                "finetune": {"base": str(model), "method": "lora", "examples": str(examples)},
                "train": {
                    "steps": 1_000_000,
                    "max_minutes": self.chat_seconds / 60,
                    "micro_batch_size": 8,
                    "global_batch_size": 8,
                    "eval_every": 0,
                    "eval_batches": 4,
                },
                "checkpoint": {"dir": str(self.out / "chat-train"), "every": 20, "keep_last": 1},
            }
            result = self._fit(_finetune_recipe(raw), again)
            return {**result, "summary": f"{count} starter instructions, {result['summary']}"}

        inputs = (self.chat_seconds, self.settings.chat.examples)
        adapter = self._model_stage("chat", "LoRA on starter instructions", inputs, finetune)
        return self._merge_adapter(Path(adapter["checkpoint"]), self.out / "chat")

    def _fit(self, recipe: Recipe, again: bool) -> dict:
        """Train (resuming after an interruption of the same stage) in this process."""
        if recipe.finetune.base:
            from llmctl.train.finetune import FinetuneTrainer as TrainerClass
        else:
            from llmctl.train.trainer import Trainer as TrainerClass

        resume = again and latest_checkpoint(recipe.run_dir) is not None
        trainer = TrainerClass(recipe, self.context, on_event=self.on_training_event)
        result = trainer.fit(resume="auto" if resume else None, overwrite=not resume)
        if result.interrupted:
            raise TrainingInterrupted(f"training stopped at step {result.final_step}, after its checkpoint")
        loss = f", validation loss {result.val_loss:.3f}" if result.val_loss is not None else ""
        return {
            "checkpoint": str(result.checkpoint),
            "steps": result.final_step,
            "summary": f"{result.final_step:,} steps{loss}",
        }

    def _merge_adapter(self, adapter: Path, out: Path) -> Path:
        from llmctl.adapters import merge_adapter

        def merge(again: bool) -> dict:
            merge_adapter(adapter, out, overwrite=True)
            return {"summary": f"-> {out}"}

        self._model_stage(f"merge-{out.name}", "fold the adapter into the weights", (), merge)
        return out

    # -- after training --------------------------------------------------------------------------------------

    def _evaluate(self, name: str, checkpoint: Path, corpus: Path) -> dict:
        out = self.out / f"{name}.json"

        def evaluate(again: bool) -> dict:
            from llmctl.evaluate.runner import Evaluator

            record = Evaluator(checkpoint).evaluate(data=corpus)
            atomic_write_text(out, json.dumps(record, indent=2) + "\n")
            numbers = record["results"]["perplexity"]
            kept = {key: numbers[key] for key in ("token_perplexity", "bits_per_byte", "documents", "tokens")}
            summary = f"perplexity {kept['token_perplexity']:.3f}, {kept['bits_per_byte']:.4f} bits per byte"
            return {**kept, "file": str(out), "summary": summary}

        return self._stage(name, "held-out perplexity", (self.model_key, self.keys["corpus"]), evaluate)

    def _quantize(self, model: Path, corpus: Path) -> Path:
        if not self.settings.quantize:
            return model
        from llmctl.compress.run import quantize_checkpoint
        from llmctl.quantization.quantize import QuantizationSettings

        out = self.out / "int8"

        def quantize(again: bool) -> dict:
            heldout = list(iter_texts(corpus, "val"))[:HELDOUT_DOCUMENTS]
            source, int8 = quantize_checkpoint(model, out, QuantizationSettings("int8"), heldout)
            cost = int8.change_against(source) or 0.0
            before, after = source.decode_tokens_per_second or 0.0, int8.decode_tokens_per_second or 0.0
            kept = after > before and cost <= MAX_QUANTIZATION_COST
            if not kept:
                shutil.rmtree(out, ignore_errors=True)
            verdict = "kept" if kept else "not kept"
            summary = f"int8 {verdict}: perplexity {cost:+.2%}, decode {before:.0f} -> {after:.0f} tokens/s"
            return {"kept": kept, "summary": summary}

        result = self._stage(
            "quantize", "int8, kept when faster at <= 1% perplexity", (self.model_key,), quantize
        )
        if result["kept"]:
            self.model_key = self.keys["quantize"]
        return out if result["kept"] else model

    def _deliver(self, served: Path, corpus: Path, evaluation: list[tuple[str, dict]]) -> Path:
        """`out/model`: the served checkpoint's files (hard links where the disk allows) and its model card."""
        out = self.out / "model"

        def deliver(again: bool) -> dict:
            staging = self.out / ".model.staging"
            shutil.rmtree(staging, ignore_errors=True)
            skip = shutil.ignore_patterns("trainer_state.pt", CARD_FILE)
            shutil.copytree(served, staging, copy_function=_link_or_copy, ignore=skip)
            card = model_card(self._card_facts(corpus, evaluation, quantized=served.name == "int8"))
            (staging / CARD_FILE).write_text(card, encoding="utf-8")
            write_digest_manifest(staging)
            shutil.rmtree(out, ignore_errors=True)
            os.replace(staging, out)
            return {"summary": f"{out}, with its model card"}

        self._stage(
            "model",
            "the served checkpoint and its model card",
            (self.model_key, self.keys["evaluate"]),
            deliver,
        )
        return out

    def _card_facts(self, corpus: Path, evaluation: list[tuple[str, dict]], quantized: bool) -> CardFacts:
        model, train = self.recipe.get("model", {}), self.recipe.get("train", {})
        training = {
            "method": "LoRA continued pretraining" if self.request.base else "pretraining from scratch",
            "shape": f"d_model {model.get('d_model')}, {model.get('n_layer')} layers, {model.get('n_head')} heads",
            "vocabulary": f"{model.get('vocab_size'):,}",
            "context": str(train.get("seq_len") or model.get("max_seq_len")),
            "optimizer": f"{self.recipe.get('optim', {}).get('name')}, peak lr {self.recipe.get('optim', {}).get('lr')}",
            "budget": f"{self.request.budget_seconds / 60:g} minutes, every stage included",
        }
        training.update(
            {done.name: done.summary for done in self.done if done.name in ("size", "train", "adapt", "chat")}
        )
        return CardFacts(
            name=self.request.name,
            documents=str(self.request.docs),
            corpus=read_manifest(corpus),
            training=training,
            evaluation=evaluation,
            base=self.request.base_label,
            served="int8 (llmctl's quantized layers)" if quantized else "float32",
        )

    def _register(self, model: Path) -> str:
        def register(again: bool) -> dict:
            from llmctl.registry.store import ModelRegistry

            registry = ModelRegistry()
            version = registry.register(model, self.request.name, note=f"llmctl up {self.request.docs}")
            evaluation = self.out / "evaluate.json"
            results = json.loads(evaluation.read_text())
            registry.attach(version.reference, results, evaluation, "heldout", force=True)
            return {"reference": version.reference, "summary": version.reference}

        inputs = (self.keys["model"],)
        return self._stage("register", "a registry version with lineage and evaluation", inputs, register)[
            "reference"
        ]

    def _report(self) -> Path:
        from llmctl.train.run_report import write_report

        runs = [
            self.out / name
            for name in ("train", "adapt", "chat-train")
            if (self.out / name / "metrics.jsonl").is_file()
        ]
        out = self.out / "report"

        def report(again: bool) -> dict:
            page = write_report(runs, out, [], overwrite=True)
            return {"page": str(page), "summary": str(page)}

        return Path(
            self._stage("report", "training curves as one HTML page", (self.keys["register"],), report)[
                "page"
            ]
        )


def check_request(request: UpRequest) -> tuple[list[Path], int]:
    """The documents to read and their bytes; every problem a user can fix, before any work starts."""
    docs, out = Path(request.docs), Path(request.out)
    if not docs.is_dir():
        raise UserError(f"{docs} is not a folder; give the folder of documents to build the model from")
    if out.resolve() == docs.resolve() or docs.resolve() in out.resolve().parents:
        raise UserError(f"--out {out} is inside the documents {docs}; write it elsewhere (default runs/NAME)")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder")
    if not any(path.is_file() for path in docs.rglob("*")):
        raise UserError(f"{docs} holds no files; put the documents to learn from in it")
    documents, _ = expand_sources([str(docs)])
    size = sum(path.stat().st_size for path in documents)
    if size == 0:
        raise UserError(f"every readable file in {docs} is empty")
    if request.base is not None:
        _check_base(Path(request.base))
    return documents, size


def _check_base(base: Path) -> None:
    if _is_gguf(base):
        return
    if not base.exists():
        raise UserError(f"--base {base} does not exist; give a model directory, a .gguf file or NAME@ALIAS")
    problem = checkpoint_problem(base) if base.is_dir() else "it is a file but not a .gguf model"
    if problem or not (base / CONFIG_FILE).is_file():
        raise UserError(f"--base {base} is not a model: {problem or 'it has no ' + CONFIG_FILE}")


def _is_gguf(path: Path | None) -> bool:
    return path is not None and Path(path).is_file() and Path(path).suffix == ".gguf"


def _base_parameters(base: Path) -> int:
    if _is_gguf(base):
        return Path(base).stat().st_size // 2
    from llmctl.model.hf_format import read_config

    return read_config(Path(base)).num_parameters()


def _base_context(base: Path) -> int:
    from llmctl.model.hf_format import read_config

    return read_config(base).max_seq_len


def _tokenizer_size(tokenizer: Path) -> int:
    from llmctl.data.tokenizer import open_tokenizer

    return open_tokenizer(tokenizer).vocab_size


def _corpus_bytes(corpus: Path) -> int:
    return sum(path.stat().st_size for path in corpus.rglob("*.jsonl*"))


def _checkpoint_every(tokens_per_second: float, step_tokens: int) -> int:
    """Steps between checkpoints: about two minutes of training, so an interruption loses at most that."""
    return max(10, int(120 * tokens_per_second / step_tokens))


def _shape_summary(choice: ShapeChoice, seconds: float) -> str:
    shape = choice.shape
    return (
        f"d_model {shape.d_model}, {shape.n_layer} layers ({choice.parameters / 1e6:.1f}M parameters), about "
        f"{choice.tokens / 1e6:.1f}M tokens in {seconds / 60:.1f} min: {choice.reason}"
    )


def _finetune_recipe(raw: dict) -> Recipe:
    from llmctl.train.finetune import finetune_recipe

    return finetune_recipe(recipe_from_dict(raw, source="llmctl up --set"))


def _toml(text: str) -> dict:
    import tomllib

    return tomllib.loads(text)


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)
