"""`llmctl serve [CKPT | NAME=CKPT ...]`: an OpenAI-compatible HTTP API with continuous batching. The flags
become one `infer.serve_options.ServeOptions`, which checks them and builds the app."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from llmctl.commands.decode_option import COMPILE

app = typer.Typer(add_completion=False)

Models = Annotated[
    list[str] | None,
    typer.Argument(
        help="Checkpoints or NAME@VERSION|ALIAS, optionally named: A=runs/a/... (default: newest under runs/)."
    ),
]
Host = Annotated[str, typer.Option(help="Interface to bind.")]
Port = Annotated[int, typer.Option(min=1, max=65535)]
ApiKey = Annotated[
    str | None, typer.Option(envvar="LLMCTL_API_KEY", help="Require 'Authorization: Bearer KEY'.")
]
MaxConcurrency = Annotated[int, typer.Option(min=1, help="Requests in flight before answering 429.")]
MaxBatch = Annotated[int, typer.Option(min=1, help="Requests decoded together per step, per model.")]
Route = Annotated[list[str], typer.Option(help="Weighted alias for A/B tests: stable=A:0.9,B:0.1.")]
Fallback = Annotated[
    list[str],
    typer.Option(
        help="ALIAS=MODEL, repeatable: a request of ALIAS (a --route alias or a model) whose model's engine is "
        "down or fails it is served, or finished, by MODEL (same tokenizer)."
    ),
]
Adapter = Annotated[
    list[str],
    typer.Option(
        help="LoRA adapters served beside the one base checkpoint, on one copy of its weights: NAME=DIR or "
        "DIR, repeatable (--adapter legal=A1 --adapter hr=A2)."
    ),
]
Force = Annotated[
    bool,
    typer.Option("--force", help="Serve adapters on a base other than the weights they were trained on."),
]
Context = Annotated[
    int | None,
    typer.Option(min=2, help="Positions each request may use (default: the model's, up to 8192 per row)."),
]
ChatTemplate = Annotated[
    Path | None,
    typer.Option(
        help="A Jinja chat template file for /v1/chat/completions, for models that ship none (default: each "
        "model's own, else llmctl's markers; a model with neither serves completions only)."
    ),
]
Draft = Annotated[
    str | None,
    typer.Option(
        help="A smaller checkpoint with the served model's tokenizer (a distilled student, say): speculative "
        "decoding inside the continuous batch."
    ),
]
Lookahead = Annotated[
    int,
    typer.Option(
        min=1, max=16, help="With --draft: draft tokens proposed per pass of the model (2-6 usually)."
    ),
]
PrefixCacheTokens = Annotated[
    int,
    typer.Option(
        min=0,
        help="Positions of finished requests kept per model for prompts that begin the same way (0: off).",
    ),
]
AbLog = Annotated[
    Path | None,
    typer.Option(
        help="Append every served request (variant, user digest, latency, tokens) and POST /v1/feedback scores "
        "to this JSONL file, for llmctl ab report."
    ),
]
LogPrompts = Annotated[
    bool,
    typer.Option(
        "--log-prompts", help="Also keep prompt and reply text in --ab-log (off: no text is stored)."
    ),
]


@app.command(name="serve")
def serve(
    models: Models = None,
    host: Host = "127.0.0.1",
    port: Port = 8000,
    api_key: ApiKey = None,
    max_concurrency: MaxConcurrency = 64,
    max_batch: MaxBatch = 16,
    route: Route = [],  # noqa: B006  (Typer reads the default; it is never mutated)
    fallback: Fallback = [],  # noqa: B006
    adapter: Adapter = [],  # noqa: B006
    force: Force = False,
    context: Context = None,
    chat_template: ChatTemplate = None,
    compile: bool | None = COMPILE,
    draft: Draft = None,
    lookahead: Lookahead = 4,
    prefix_cache_tokens: PrefixCacheTokens = 4096,
    ab_log: AbLog = None,
    log_prompts: LogPrompts = False,
) -> None:
    """Serve checkpoints under /v1/completions and /v1/chat/completions (streaming), /v1/models, /metrics."""
    from llmctl.commands.checkpoint_args import parse_models, resolve_checkpoint
    from llmctl.infer.serve_options import ServeOptions, check_key_and_log

    check_key_and_log(api_key, ab_log, log_prompts)
    options = ServeOptions(
        parse_models(models),
        parse_models(adapter) if adapter else {},
        route,
        fallback,
        api_key,
        max_concurrency,
        max_batch,
        force,
        context,
        chat_template,
        compile,
        resolve_checkpoint(draft) if draft is not None else None,
        lookahead,
        prefix_cache_tokens,
        ab_log,
        log_prompts,
    )
    application = options.app(report=lambda line: typer.echo(line, err=True))
    import uvicorn  # in the serve extra, which options.app has checked

    state = application.state.llmctl
    typer.echo(f"serving {', '.join([*state.models, *state.routes])} on http://{host}:{port}/v1")
    uvicorn.run(application, host=host, port=port, log_level="warning", timeout_graceful_shutdown=30)
