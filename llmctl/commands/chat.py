"""`llmctl chat [CKPT]`: talk to a checkpoint in a Textual app, or line by line with --plain or a pipe."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from llmctl.commands.decode_option import COMPILE

app = typer.Typer(add_completion=False)


Checkpoint = Annotated[
    str | None,
    typer.Argument(
        help="Checkpoint directory or registered NAME@VERSION|ALIAS (default: the newest under runs/)."
    ),
]
Plain = Annotated[
    bool, typer.Option("--plain", help="Line-based REPL (automatic when stdin is not a terminal).")
]
Adapter = Annotated[
    Path | None,
    typer.Option(help="A LoRA adapter (llmctl finetune) to apply to the checkpoint, which is its base."),
]
Force = Annotated[
    bool, typer.Option("--force", help="Apply an adapter to a base other than the weights it was trained on.")
]
ChatTemplate = Annotated[
    Path | None,
    typer.Option(
        help="A Jinja chat template file, for a model that ships none (default: the model's own, "
        "chat_template.jinja or tokenizer_config.json's, else llmctl's markers)."
    ),
]
Context = Annotated[
    int | None,
    typer.Option(min=2, help="Positions the conversation may use (default: the model's, up to 8192)."),
]
System = Annotated[str | None, typer.Option(help="System prompt.")]
Temperature = Annotated[float, typer.Option(min=0.0, max=2.0)]
MaxTokens = Annotated[int, typer.Option(min=1)]
Draft = Annotated[
    str | None,
    typer.Option(
        help="A smaller checkpoint with the same tokenizer (a distilled student, say): speculative decoding."
    ),
]
Lookahead = Annotated[
    int,
    typer.Option(
        min=1, max=16, help="With --draft: draft tokens proposed per pass of the model (2-6 usually)."
    ),
]
JsonSchema = Annotated[Path | None, typer.Option(help="Every reply is JSON matching this JSON schema file.")]
Regex = Annotated[str | None, typer.Option(help="Every reply matches this regular expression.")]
Choice = Annotated[str | None, typer.Option(help="Every reply is one of these comma-separated strings.")]


@app.command(name="chat")
def chat(
    checkpoint: Checkpoint = None,
    plain: Plain = False,
    adapter: Adapter = None,
    force: Force = False,
    chat_template: ChatTemplate = None,
    context: Context = None,
    system: System = None,
    temperature: Temperature = 0.7,
    max_tokens: MaxTokens = 256,
    compile: bool | None = COMPILE,
    draft: Draft = None,
    lookahead: Lookahead = 4,
    json_schema: JsonSchema = None,
    regex: Regex = None,
    choice: Choice = None,
) -> None:
    """Chat with a model; /reset, /system TEXT, /set temperature 0.7, /save FILE work in both modes."""
    from llmctl.commands.checkpoint_args import resolve_checkpoint
    from llmctl.infer.chat_session import ChatOptions, chat_sampling
    from llmctl.runtime import in_passing_thread

    path = resolve_checkpoint(checkpoint)
    settings = chat_sampling(temperature, max_tokens)
    options = ChatOptions(path, adapter, force, chat_template, context, system, settings, bool(compile))
    options.draft = resolve_checkpoint(draft) if draft is not None else None
    options.lookahead, options.constraint = lookahead, reply_constraint(json_schema, regex, choice)
    # the UI replies from worker threads: the loading thread must not live on with its OpenMP workers
    session = in_passing_thread(lambda: options.open(report=lambda line: typer.echo(line, err=True)))
    plain = plain or not sys.stdin.isatty()
    if compile is None and session.draft is None and session.model.device.type == "cpu":
        from llmctl.infer.background_compile import compile_in_background

        # the full-screen UI owns the terminal: only the plain REPL says when the compiled step takes over
        report = (lambda line: typer.echo(line, err=True)) if plain else (lambda line: None)
        compile_in_background(session.model, 1, report)
    if plain:
        run_plain(session)
        return
    try:
        from llmctl.tui.chat import ChatApp
    except ImportError as error:
        from llmctl.errors import UserError

        raise UserError(
            f"the chat UI needs the tui extra ({error.name} is missing): pip install 'llmctl[tui]', or use --plain"
        ) from None
    ChatApp(session, str(path)).run()


def reply_constraint(json_schema: Path | None, regex: str | None, choice: str | None):
    """The ConstraintSpec the options ask every reply to follow (at most one of them), or None."""
    from llmctl.errors import UserError
    from llmctl.infer.constraints import ConstraintSpec

    given = [option for option in (json_schema, regex, choice) if option is not None]
    if len(given) > 1:
        raise UserError("give one of --json-schema, --regex and --choice")
    if json_schema is not None:
        try:
            return ConstraintSpec("json_schema", json.loads(json_schema.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise UserError(f"--json-schema {json_schema}: not a readable JSON file ({error})") from None
    if regex is not None:
        return ConstraintSpec("regex", regex)
    if choice is not None:
        return ConstraintSpec("choice", [option.strip() for option in choice.split(",") if option.strip()])
    return None


def run_plain(session) -> None:
    """One reply per input line; slash commands are answered on a line of their own; a message too long for
    the context is reported and the conversation goes on."""
    from llmctl.infer.decode import PromptTooLong

    interactive = sys.stdin.isatty()
    sys.stdin.reconfigure(errors="replace")  # bytes that are not UTF-8 become U+FFFD, not a traceback
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            print(session.command(text), flush=True)
            continue
        try:
            for delta in session.reply(text):
                print(delta, end="", flush=True)
        except PromptTooLong as error:
            print(f"error: {error}", end="")
        print(flush=True)
