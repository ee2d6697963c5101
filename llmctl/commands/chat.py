"""`llmctl chat [CKPT]`: talk to a checkpoint in a Textual app, or line by line with --plain or a pipe."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from llmctl.commands.decode_option import COMPILE

app = typer.Typer(add_completion=False)


@app.command(name="chat")
def chat(
    checkpoint: str | None = typer.Argument(
        None, help="Checkpoint directory or registered NAME@VERSION|ALIAS (default: the newest under runs/)."
    ),
    plain: bool = typer.Option(
        False, "--plain", help="Line-based REPL (automatic when stdin is not a terminal)."
    ),
    adapter: Path | None = typer.Option(
        None, help="A LoRA adapter (llmctl finetune) to apply to the checkpoint, which is its base."
    ),
    force: bool = typer.Option(
        False, "--force", help="Apply an adapter to a base other than the weights it was trained on."
    ),
    chat_template: Path | None = typer.Option(
        None,
        help="A Jinja chat template file, for a model that ships none (default: the model's own, "
        "chat_template.jinja or tokenizer_config.json's, else llmctl's markers).",
    ),
    context: int | None = typer.Option(
        None, min=2, help="Positions the conversation may use (default: the model's, up to 8192)."
    ),
    system: str | None = typer.Option(None, help="System prompt."),
    temperature: float = typer.Option(0.7, min=0.0, max=2.0),
    max_tokens: int = typer.Option(256, min=1),
    compile: bool | None = COMPILE,
    draft: str | None = typer.Option(
        None,
        help="A smaller checkpoint with the same tokenizer (a distilled student, say): speculative decoding.",
    ),
    lookahead: int = typer.Option(
        4, min=1, max=16, help="With --draft: draft tokens proposed per pass of the model (2-6 usually)."
    ),
    json_schema: Path | None = typer.Option(None, help="Every reply is JSON matching this JSON schema file."),
    regex: str | None = typer.Option(None, help="Every reply matches this regular expression."),
    choice: str | None = typer.Option(None, help="Every reply is one of these comma-separated strings."),
) -> None:
    """Chat with a model; /reset, /system TEXT, /set temperature 0.7, /save FILE work in both modes."""
    from llmctl.commands.checkpoint_args import resolve_checkpoint
    from llmctl.infer.chat_session import ChatSession, chat_sampling
    from llmctl.infer.decode import (
        compile_decode,
        limit_context,
        load_draft,
        load_for_inference,
        open_chat,
        warm_up_decode,
    )
    from llmctl.runtime import in_passing_thread

    path = resolve_checkpoint(checkpoint)
    draft_path = resolve_checkpoint(draft) if draft is not None else None
    constraint = reply_constraint(json_schema, regex, choice)

    def load() -> ChatSession:
        model, tokenizer = load_for_inference(path, adapter, force_base=force)
        limit_context(model, context)
        chat_format = open_chat(path, tokenizer, adapter, chat_template)
        if compile:
            typer.echo("compiling the decode step (once per start; tens of seconds)...", err=True)
            compile_decode(model)
            warm_up_decode(model, model.new_kv_cache(1, max_len=8, slots=True))
        session = ChatSession(
            model, tokenizer, chat_format, system=system, settings=chat_sampling(temperature, max_tokens)
        )
        if draft_path is not None:
            session.draft = load_draft(draft_path, tokenizer, model)
            session.lookahead = lookahead
        if constraint is not None:
            session.constraint = constraint
            check_constraint(session)
        return session

    # the UI replies from worker threads: the loading thread must not live on with its OpenMP workers
    session = in_passing_thread(load)
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


def check_constraint(session) -> None:
    """Compile the session's constraint once at start, so a schema the engine refuses stops chat now."""
    from llmctl.errors import UserError
    from llmctl.infer.constraints import ConstraintError

    try:
        session.compiled_constraint()
    except ConstraintError as error:
        raise UserError(f"cannot constrain the replies: {error}") from None


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
