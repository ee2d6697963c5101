"""What `llmctl serve` was asked for, checked as a whole before anything loads (which flags combine, routes
and fallbacks that name served models), and the one call that loads the models and builds the app from it:
the command, the tests and any other front end serve through `ServeOptions`."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from llmctl.errors import UserError
from llmctl.infer.served import ServedModel, load_served_adapters, load_served_model
from llmctl.infer.speculative import DEFAULT_LOOKAHEAD

Routes = dict[str, list[tuple[str, float]]]


@dataclass
class ServeOptions:
    models: dict[str, Path]  # served name -> checkpoint directory
    adapters: dict[str, Path] = field(default_factory=dict)  # LoRA adapters on the one base in `models`
    routes: list[str] = field(default_factory=list)  # "stable=A:0.9,B:0.1"
    fallbacks: list[str] = field(default_factory=list)  # "ALIAS=MODEL"
    api_key: str | None = None
    max_concurrency: int = 64
    max_batch: int = 16
    force: bool = False  # adapters on other base weights than they were trained on
    context: int | None = None
    chat_template: Path | None = None
    compile: bool | None = None  # None: in the background on a CPU
    draft: Path | None = None
    lookahead: int = DEFAULT_LOOKAHEAD
    prefix_cache_tokens: int = 4096
    ab_log: Path | None = None
    log_prompts: bool = False

    def check(self) -> Routes:
        """The flag combinations serve refuses, each a UserError naming the fix; the parsed routes."""
        check_key_and_log(self.api_key, self.ab_log, self.log_prompts)
        if self.adapters and len(self.models) != 1:
            raise UserError("--adapter needs exactly one base checkpoint to serve the adapters on")
        clash = set(self.adapters) & set(self.models)
        if clash:
            raise UserError(
                f"adapter name {', '.join(sorted(clash))} is also the base's name; name it: --adapter NAME=DIR"
            )
        if self.adapters and self.compile:
            raise UserError(
                "--compile does not combine with --adapter (each mix of adapters in a batch would compile "
                "anew): merge the adapter (llmctl finetune merge) and serve the merged checkpoint with --compile"
            )
        if self.draft is not None and (self.adapters or len(self.models) != 1):
            raise UserError(
                "--draft serves one checkpoint without adapters: give exactly one model (merge an adapter first "
                "with llmctl finetune merge)"
            )
        return parse_routes(self.routes, set(self.models) | set(self.adapters))

    def load(self, report: Callable[[str], None] = lambda line: None) -> dict[str, ServedModel]:
        """Every served model, loaded and started (the adapters on one copy of their base)."""
        if self.adapters:
            ((base_name, base),) = self.models.items()
            served = load_served_adapters(
                base_name,
                base,
                self.adapters,
                max_batch=self.max_batch,
                force_base=self.force,
                chat_template=self.chat_template,
                context=self.context,
            )
            report(
                f"loaded {base_name} from {base} with adapters {', '.join(self.adapters)} (one copy of the base)"
            )
            return served
        served = {}
        for name, path in self.models.items():
            served[name] = load_served_model(
                name,
                path,
                max_batch=self.max_batch,
                compile=self.compile,
                prefix_cache_tokens=self.prefix_cache_tokens,
                draft=self.draft,
                lookahead=self.lookahead,
                force_base=self.force,
                chat_template=self.chat_template,
                context=self.context,
                report=lambda line, name=name: report(f"{name}: {line}"),
            )
            drafting = f", draft {self.draft}" if self.draft is not None else ""
            report(f"loaded {name} from {path} (context {served[name].context} tokens{drafting})")
        return served

    def app(self, report: Callable[[str], None] = lambda line: None):
        """The OpenAI-compatible app over the loaded models (checked first; a UserError before any load)."""
        try:
            from llmctl.infer.server import create_app
        except ImportError as error:
            raise UserError(
                f"llmctl serve needs the serve extra ({error.name} is missing): pip install 'llmctl[serve]'"
            ) from None
        routes = self.check()
        served = self.load(report)
        log = None
        if self.ab_log is not None:
            from llmctl.infer.ab_log import CompletionLog

            log = CompletionLog(self.ab_log, self.log_prompts)
        return create_app(
            served,
            routes=routes,
            api_key=self.api_key,
            max_concurrency=self.max_concurrency,
            ab_log=log,
            fallbacks=parse_fallbacks(self.fallbacks, served, routes),
        )


def check_key_and_log(api_key: str | None, ab_log: Path | None, log_prompts: bool) -> None:
    """The flags that need no model to check: a front end calls it before it resolves any checkpoint."""
    if api_key is not None and not api_key.strip():
        raise UserError(
            "--api-key is empty (an unset variable?): pass a key, or leave the option out to serve without one"
        )
    if log_prompts and ab_log is None:
        raise UserError("--log-prompts needs --ab-log FILE, the log the text would go to")
    if ab_log is not None and ab_log.is_dir():
        raise UserError(f"--ab-log {ab_log} is a folder; give a file path such as {ab_log / 'ab.jsonl'}")


def parse_fallbacks(arguments: list[str], served: dict[str, ServedModel], routes: Routes) -> dict[str, str]:
    """'bot=B' -> {'bot': 'B'}: the alias (or model) exists, B is served, and B shares its models' tokenizer
    (a fallback continues a reply from its tokens)."""
    fallbacks = {}
    for argument in arguments:
        alias, sep, model = argument.partition("=")
        if not sep or alias not in {*served, *routes} or model not in served:
            raise UserError(
                f"--fallback {argument!r}: expected ALIAS=MODEL with ALIAS a --route alias or a served model and "
                f"MODEL a served model ({', '.join(sorted(served))})"
            )
        variants = [name for name, _ in routes[alias]] if alias in routes else [alias]
        digest = served[model].tokenizer.sha256()
        if any(served[name].tokenizer.sha256() != digest for name in variants):
            raise UserError(f"--fallback {argument!r}: {model} has another tokenizer than {alias}'s models")
        fallbacks[alias] = model
    return fallbacks


def parse_routes(arguments: list[str], models: set[str]) -> Routes:
    """'stable=A:0.9,B:0.1' -> {'stable': [('A', 0.9), ('B', 0.1)]}; weights are positive and finite."""
    routes: Routes = {}
    for argument in arguments:
        alias, sep, spec = argument.partition("=")
        if not sep or not spec:
            raise UserError(f"--route {argument!r}: expected ALIAS=MODEL:WEIGHT,MODEL:WEIGHT")
        if alias in models:
            raise UserError(f"--route alias {alias!r} is also a model name; pick another alias")
        targets = []
        for part in spec.split(","):
            name, _, weight_text = part.partition(":")
            if name not in models:
                raise UserError(
                    f"--route {argument!r}: {name!r} is not a served model ({', '.join(sorted(models))})"
                )
            try:
                weight = float(weight_text or 1)
            except ValueError:
                raise UserError(f"--route {argument!r}: weight {weight_text!r} is not a number") from None
            if not (math.isfinite(weight) and weight > 0):
                raise UserError(f"--route {argument!r}: weight {weight_text!r} must be a positive number")
            targets.append((name, weight))
        routes[alias] = targets
    return routes
