"""`llmctl up DOCS`: a folder of documents to an evaluated, registered domain model within a time budget,
composed from the engine functions the single commands call. Each stage's output is keyed by a digest of its
inputs and settings (`ledger.py`): a re-run reuses a stage whose key is unchanged, and each key includes the
key of the stage that made its input, so a change redoes everything after it."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path

from llmctl.data.corpus import build_corpus, iter_texts, read_manifest
from llmctl.errors import UserError
from llmctl.pipeline import delivery, training
from llmctl.pipeline.budget import MIN_TRAIN_SECONDS, training_split
from llmctl.pipeline.ledger import Ledger, documents_digest, settings_key
from llmctl.pipeline.model_card import CardFacts, model_card
from llmctl.pipeline.plan import Plan, make_plan, vocabulary_for
from llmctl.pipeline.request import StageDone, StageStarted, UpRequest, UpResult, check_request, is_gguf
from llmctl.pipeline.sizing import choose_shape
from llmctl.recipe import Recipe, recipe_from_dict

Event = Callable[[object], None]
Action = Callable[[bool], dict]
TRAINING_RUNS = ("train", "adapt", "chat-train")


class UpPipeline:
    def __init__(self, request: UpRequest, on_event: Event, on_training_event: Event) -> None:
        self.request, self.settings = request, request.settings
        self.on_event, self.on_training_event = on_event, on_training_event
        self.out = Path(request.out)
        self.heldout = self.out / "heldout.jsonl"  # the evaluation set: part of the corpus's held-out split
        self.started = time.perf_counter()  # the budget counts from here: checks and plan included
        self.documents, self.document_bytes = check_request(request)
        self.keys: dict[str, str] = {}
        self.model_key = "from scratch"  # the key of the stage that made the current model
        self.chat_seconds = 0.0
        self.recipe: dict = {}  # the training recipe, once settled
        self.done: list[StageDone] = []

    def plan(self) -> Plan:
        return make_plan(self.request, self.document_bytes, self.started)

    def run(self, plan: Plan) -> UpResult:
        """Every stage in order, reusing those whose inputs are unchanged."""
        from llmctl.train.distributed import init_distributed, shutdown_distributed

        self.plan_made = plan
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
            evaluation.append(("base", self._evaluate("evaluate-base", base)))
            trained = self._adapt(base, tokens, corpus)
        else:
            trained = self._pretrain(corpus, tokenizer, tokens)
        final = self._chat(trained, corpus)
        evaluation.append(("adapted" if base else "trained", self._evaluate("evaluate", final)))
        served = self._quantize(final)
        model = self._deliver(served, corpus, evaluation)
        registered, report = self._register(model), self._report()
        return UpResult(model, registered, model / delivery.CARD_FILE, report, evaluation, self.done)

    # -- stages and their keys -------------------------------------------------------------------------------

    def _stage(self, name: str, what: str, inputs: tuple, action: Action) -> dict:
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

    def _model_stage(self, name: str, what: str, inputs: tuple, action: Action) -> dict:
        """A stage that makes a new model from the current one: its key follows the current model's, and
        becomes it."""
        result = self._stage(name, what, (self.model_key, *inputs), action)
        self.model_key = self.keys[name]
        return result

    def _finished(self, done: StageDone) -> None:
        self.done.append(done)
        self.on_event(done)

    # -- the data --------------------------------------------------------------------------------------------

    def _import_base(self) -> Path | None:
        """The base as a checkpoint directory (a GGUF file imported), and its key: the digest of its files,
        so a base changed in place is trained on again."""
        from llmctl.digests import file_sha256, files_sha256

        base = self.request.base
        if base is None:
            return None
        if not is_gguf(base):
            self.model_key = files_sha256(base)
            return base
        from llmctl.compress.gguf_import import import_gguf

        out = self.out / "base"

        def convert(again: bool) -> dict:
            shutil.rmtree(out, ignore_errors=True)
            import_gguf(base, out)
            return {"summary": f"{base.name} -> {out}"}

        self._stage("import", "turn the GGUF file into a checkpoint", (file_sha256(base),), convert)
        self.model_key = self.keys["import"]
        return out

    def _corpus(self) -> Path:
        out, docs = self.out / "corpus", Path(self.request.docs)
        options = self.settings.corpus_options()

        def build(again: bool) -> dict:
            manifest = build_corpus([str(docs)], out, options, overwrite=True)
            train, val = (manifest["splits"][split]["documents"] for split in ("train", "val"))
            if not train:
                raise UserError(f"no document of {docs} kept any text after cleaning and filtering")
            evaluated = delivery.write_heldout(out, self.heldout)
            return {"summary": f"{train:,} training and {val:,} held-out documents ({evaluated} evaluated)"}

        inputs = (documents_digest(self.documents, docs), repr(options))
        self._stage("corpus", "clean, filter, de-duplicate and split", inputs, build)
        return out

    def _tokenizer(self, corpus: Path) -> Path:
        from llmctl.data.tokenizer import train_tokenizer

        out = self.out / "tokenizer"
        text_bytes = sum(path.stat().st_size for path in corpus.rglob("*.jsonl*"))
        vocab = vocabulary_for(self.settings, text_bytes)
        model_type = self.settings.tokenizer.get("model_type", "bpe")

        def train(again: bool) -> dict:
            report = train_tokenizer(corpus, out, vocab, model_type=model_type, overwrite=True)
            return {"summary": f"{report['vocab_size']:,} pieces, {report['fertility']:.2f} tokens per word"}

        self._stage("tokenizer", "train the vocabulary", (self.keys["corpus"], vocab, model_type), train)
        return out / "tokenizer.model"

    def _tokens(self, corpus: Path, tokenizer: Path) -> Path:
        from llmctl.data.token_files import encode_corpus

        out = self.out / "tokens"
        upstream = self.keys.get("tokenizer") or self.model_key  # the base's, when it brings the tokenizer

        def encode(again: bool) -> dict:
            counts = encode_corpus(corpus, tokenizer, out, overwrite=True)["tokens"]
            return {"summary": f"{counts['train']:,} training and {counts['val']:,} held-out tokens"}

        self._stage("tokens", "encode both splits", (self.keys["corpus"], upstream), encode)
        return out

    # -- training --------------------------------------------------------------------------------------------

    def _split_seconds(self) -> tuple[float, float]:
        """(training, chat finetuning) seconds: what the budget leaves now that the data stages are done,
        less the planned seconds of the stages after training."""
        spent = time.perf_counter() - self.started
        left = self.request.budget_seconds - spent - self.plan_made.seconds_after_training()
        chat = self.settings.chat
        share = chat.share if chat.enabled else 0.0
        return training_split(max(left, MIN_TRAIN_SECONDS), share, 60 * chat.min_minutes)

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
        from llmctl.data.tokenizer import open_tokenizer

        def make_recipe(seconds: float) -> tuple[Recipe, str]:
            train_tokens = read_meta(tokens)["tokens"]["train"]
            vocab = open_tokenizer(tokenizer).vocab_size
            choice = choose_shape(vocab, seconds, train_tokens, self.plan_made.flops_per_second)
            paths = {"corpus": corpus, "tokens": tokens, "tokenizer": tokenizer, "run": self.out / "train"}
            raw = training.pretrain_recipe(self.request.name, choice, vocab, seconds, paths, train_tokens)
            recipe = training.with_overrides(raw, self.settings.recipe, finetune=False)
            return recipe, training.shape_summary(choice, seconds)

        recipe = self._settle(make_recipe)
        result = self._model_stage("train", "pretrain", (), lambda again: self._fit(recipe, again))
        return Path(result["checkpoint"])

    def _adapt(self, base: Path, tokens: Path, corpus: Path) -> Path:
        from llmctl.model.hf_format import read_config

        def make_recipe(seconds: float) -> tuple[Recipe, str]:
            paths = {"corpus": corpus, "tokens": tokens, "run": self.out / "adapt"}
            context = read_config(base).max_seq_len
            raw = training.adapt_recipe(self.request.name, base, seconds, paths, context)
            recipe = training.with_overrides(raw, self.settings.recipe, finetune=True)
            return recipe, f"LoRA rank {recipe.finetune.lora.rank}, {seconds / 60:.1f} min"

        recipe = self._settle(make_recipe)
        what = "continued pretraining with LoRA"
        adapter = self._model_stage("adapt", what, (), lambda again: self._fit(recipe, again))
        return self._merge_adapter(Path(adapter["checkpoint"]), self.out / "adapted")

    def _chat(self, model: Path, corpus: Path) -> Path:
        """A short LoRA finetune on starter instructions made from the corpus, when the budget left time for
        it and the corpus has headed sections to make them from; the model as it was otherwise."""
        from llmctl.data.instructions import section_examples, write_starter_set

        if not self.chat_seconds:
            return model
        if not training.can_chat(model):
            self._finished(StageDone("chat", 0.0, "skipped: the model has no chat template", False))
            return model
        if not section_examples(list(iter_texts(corpus, "train"))):
            self._finished(
                StageDone("chat", 0.0, "skipped: no headed sections to make instructions from", False)
            )
            return model
        examples = self.out / "instructions.jsonl"

        def finetune(again: bool) -> dict:
            count = write_starter_set(corpus, examples, limit=self.settings.chat.examples, overwrite=True)
            run = self.out / "chat-train"
            raw = training.chat_recipe(self.request.name, model, examples, count, self.chat_seconds, run)
            result = self._fit(training.with_overrides(raw, {}, finetune=True), again)
            return {**result, "summary": f"{count} starter instructions, {result['summary']}"}

        inputs = (self.chat_seconds, self.settings.chat.examples)
        adapter = self._model_stage("chat", "LoRA on starter instructions", inputs, finetune)
        return self._merge_adapter(Path(adapter["checkpoint"]), self.out / "chat")

    def _fit(self, recipe: Recipe, again: bool) -> dict:
        return training.fit(recipe, again, self.context, self.on_training_event)

    def _merge_adapter(self, adapter: Path, out: Path) -> Path:
        from llmctl.adapters import merge_adapter

        def merge(again: bool) -> dict:
            merge_adapter(adapter, out, overwrite=True)
            return {"summary": f"-> {out}"}

        self._model_stage(f"merge-{out.name}", "fold the adapter into the weights", (), merge)
        return out

    # -- after training --------------------------------------------------------------------------------------

    def _evaluate(self, name: str, checkpoint: Path) -> dict:
        out = self.out / f"{name}.json"
        inputs = (self.model_key, self.keys["corpus"])
        return self._stage(
            name,
            "held-out perplexity",
            inputs,
            lambda again: delivery.evaluate_checkpoint(checkpoint, self.heldout, out),
        )

    def _quantize(self, model: Path) -> Path:
        if not self.settings.quantize:
            return model
        out = self.out / "int8"
        what = "int8, kept when faster at <= 1% perplexity"
        result = self._stage(
            "quantize",
            what,
            (self.model_key,),
            lambda again: delivery.quantize_if_faster(model, self.heldout, out),
        )
        if not result["kept"]:
            return model
        self.model_key = self.keys["quantize"]
        return out

    def _deliver(self, served: Path, corpus: Path, evaluation: list[tuple[str, dict]]) -> Path:
        out = self.out / "model"

        def deliver(again: bool) -> dict:
            card = model_card(self._card_facts(corpus, evaluation, quantized=served.name == "int8"))
            return delivery.deliver_model(served, out, card)

        inputs = (self.model_key, self.keys["evaluate"])
        self._stage("model", "the served checkpoint and its model card", inputs, deliver)
        return out

    def _card_facts(self, corpus: Path, evaluation: list[tuple[str, dict]], quantized: bool) -> CardFacts:
        model, train, optim = (self.recipe.get(section, {}) for section in ("model", "train", "optim"))
        training_rows = {
            "method": "LoRA continued pretraining" if self.request.base else "pretraining from scratch",
            "shape": f"d_model {model.get('d_model')}, {model.get('n_layer')} layers, {model.get('n_head')} heads",
            "vocabulary": f"{model.get('vocab_size'):,}",
            "context": str(train.get("seq_len") or model.get("max_seq_len")),
            "optimizer": f"{optim.get('name')}, peak lr {optim.get('lr')}",
            "budget": f"{self.request.budget_seconds / 60:g} minutes, every stage included",
        }
        stages = ("size", "train", "adapt", "chat")
        training_rows.update({done.name: done.summary for done in self.done if done.name in stages})
        return CardFacts(
            name=self.request.name,
            documents=str(self.request.docs),
            corpus=read_manifest(corpus),
            training=training_rows,
            evaluation=evaluation,
            base=self.request.base_label,
            served="int8 (llmctl's quantized layers)" if quantized else "float32",
        )

    def _register(self, model: Path) -> str:
        note, evaluation = f"llmctl up {self.request.docs}", self.out / "evaluate.json"
        what = "a registry version with lineage and evaluation"
        result = self._stage(
            "register",
            what,
            (self.keys["model"],),
            lambda again: delivery.register_model(model, self.request.name, note, evaluation),
        )
        return result["reference"]

    def _report(self) -> Path:
        runs = [self.out / name for name in TRAINING_RUNS if (self.out / name / "metrics.jsonl").is_file()]
        out = self.out / "report"
        what = "training curves as one HTML page"
        result = self._stage(
            "report", what, (self.keys["register"],), lambda again: delivery.write_run_report(runs, out)
        )
        return Path(result["page"])


def _toml(text: str) -> dict:
    import tomllib

    return tomllib.loads(text)
