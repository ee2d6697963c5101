"""`llmctl serve [CKPT | NAME=CKPT ...]`: an OpenAI-compatible HTTP API with continuous batching."""

from __future__ import annotations

import math
from pathlib import Path

import typer

from llmctl.commands.decode_option import COMPILE

app = typer.Typer(add_completion=False)


@app.command(name="serve")
def serve(
    models: list[str] = typer.Argument(
        None,
        help="Checkpoints or NAME@VERSION|ALIAS, optionally named: A=runs/a/... (default: newest under runs/).",
    ),
    host: str = typer.Option("127.0.0.1", help="Interface to bind."),
    port: int = typer.Option(8000, min=1, max=65535),
    api_key: str | None = typer.Option(
        None, envvar="LLMCTL_API_KEY", help="Require 'Authorization: Bearer KEY'."
    ),
    max_concurrency: int = typer.Option(64, min=1, help="Requests in flight before answering 429."),
    max_batch: int = typer.Option(16, min=1, help="Requests decoded together per step, per model."),
    route: list[str] = typer.Option([], help="Weighted alias for A/B tests: stable=A:0.9,B:0.1."),
    fallback: list[str] = typer.Option(
        [],
        help="ALIAS=MODEL, repeatable: a request of ALIAS (a --route alias or a model) whose model's engine is "
        "down or fails it is served, or finished, by MODEL (same tokenizer).",
    ),
    adapter: list[str] = typer.Option(
        [],
        help="LoRA adapters served beside the one base checkpoint, on one copy of its weights: NAME=DIR or "
        "DIR, repeatable (--adapter legal=A1 --adapter hr=A2).",
    ),
    force: bool = typer.Option(
        False, "--force", help="Serve adapters on a base other than the weights they were trained on."
    ),
    context: int | None = typer.Option(
        None, min=2, help="Positions each request may use (default: the model's, up to 8192 per row)."
    ),
    chat_template: Path | None = typer.Option(
        None,
        help="A Jinja chat template file for /v1/chat/completions, for models that ship none (default: each "
        "model's own, else llmctl's markers; a model with neither serves completions only).",
    ),
    compile: bool | None = COMPILE,
    draft: str | None = typer.Option(
        None,
        help="A smaller checkpoint with the served model's tokenizer (a distilled student, say): speculative "
        "decoding inside the continuous batch.",
    ),
    lookahead: int = typer.Option(
        4, min=1, max=16, help="With --draft: draft tokens proposed per pass of the model (2-6 usually)."
    ),
    prefix_cache_tokens: int = typer.Option(
        4096,
        min=0,
        help="Positions of finished requests kept per model for prompts that begin the same way (0: off).",
    ),
    ab_log: Path | None = typer.Option(
        None,
        help="Append every served request (variant, user digest, latency, tokens) and POST /v1/feedback "
        "scores to this JSONL file, for llmctl ab report.",
    ),
    log_prompts: bool = typer.Option(
        False, "--log-prompts", help="Also keep prompt and reply text in --ab-log (off: no text is stored)."
    ),
) -> None:
    """Serve checkpoints under /v1/completions and /v1/chat/completions (streaming), /v1/models, /metrics."""
    from llmctl.commands.checkpoint_args import parse_models, resolve_checkpoint
    from llmctl.errors import UserError
    from llmctl.infer.served import load_served_adapters, load_served_model

    try:
        import uvicorn

        from llmctl.infer.server import create_app
    except ImportError as error:
        raise UserError(
            f"llmctl serve needs the serve extra ({error.name} is missing): pip install 'llmctl[serve]'"
        ) from None
    if api_key is not None and not api_key.strip():
        raise UserError(
            "--api-key is empty (an unset variable?): pass a key, or leave the option out to serve without one"
        )
    if log_prompts and ab_log is None:
        raise UserError("--log-prompts needs --ab-log FILE, the log the text would go to")
    if ab_log is not None and ab_log.is_dir():
        raise UserError(f"--ab-log {ab_log} is a folder; give a file path such as {ab_log / 'ab.jsonl'}")
    named = parse_models(models)
    adapters = parse_models(adapter) if adapter else {}
    if adapters and len(named) != 1:
        raise UserError("--adapter needs exactly one base checkpoint to serve the adapters on")
    clash = set(adapters) & set(named)
    if clash:
        raise UserError(
            f"adapter name {', '.join(sorted(clash))} is also the base's name; name it: --adapter NAME=DIR"
        )
    if adapters and compile:
        raise UserError(
            "--compile does not combine with --adapter (each mix of adapters in a batch would compile anew): "
            "merge the adapter (llmctl finetune merge) and serve the merged checkpoint with --compile"
        )
    if draft is not None and (adapters or len(named) != 1):
        raise UserError(
            "--draft serves one checkpoint without adapters: give exactly one model (merge an adapter first "
            "with llmctl finetune merge)"
        )
    draft_path = resolve_checkpoint(draft) if draft is not None else None
    routes = parse_routes(route, set(named) | set(adapters))
    if adapters:
        ((base_name, base),) = named.items()
        served = load_served_adapters(
            base_name,
            Path(base),
            adapters,
            max_batch=max_batch,
            force_base=force,
            chat_template=chat_template,
            context=context,
        )
        typer.echo(
            f"loaded {base_name} from {base} with adapters {', '.join(adapters)} (one copy of the base)"
        )
    else:
        served = {}
        for name, path in named.items():
            served[name] = load_served_model(
                name,
                Path(path),
                max_batch=max_batch,
                compile=compile,
                prefix_cache_tokens=prefix_cache_tokens,
                draft=draft_path,
                lookahead=lookahead,
                force_base=force,
                chat_template=chat_template,
                context=context,
                report=lambda line, name=name: typer.echo(f"{name}: {line}", err=True),
            )
            drafting = f", draft {draft_path}" if draft_path is not None else ""
            typer.echo(f"loaded {name} from {path} (context {served[name].context} tokens{drafting})")
    log = None
    if ab_log is not None:
        from llmctl.infer.ab_log import CompletionLog

        log = CompletionLog(ab_log, log_prompts)
    fallbacks = parse_fallbacks(fallback, served, routes)
    application = create_app(
        served,
        routes=routes,
        api_key=api_key,
        max_concurrency=max_concurrency,
        ab_log=log,
        fallbacks=fallbacks,
    )
    typer.echo(f"serving {', '.join([*served, *routes])} on http://{host}:{port}/v1")
    uvicorn.run(application, host=host, port=port, log_level="warning", timeout_graceful_shutdown=30)


def parse_fallbacks(arguments: list[str], served: dict, routes: dict) -> dict[str, str]:
    """'bot=B' -> {'bot': 'B'}: the alias (or model) exists, B is served, and B shares its models' tokenizer
    (a fallback continues a reply from its tokens)."""
    from llmctl.errors import UserError

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


def parse_routes(arguments: list[str], models: set[str]) -> dict[str, list[tuple[str, float]]]:
    """'stable=A:0.9,B:0.1' -> {'stable': [('A', 0.9), ('B', 0.1)]}; weights are positive and finite."""
    from llmctl.errors import UserError

    routes: dict[str, list[tuple[str, float]]] = {}
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
