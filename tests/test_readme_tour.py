"""The README's tour (and every command in docs/) is a test: every `llmctl` line of it parses against the real command tree (a renamed or
removed flag fails here), and runs through the CLI's entry point to a result or one `error:` line, never a
traceback (the tour's placeholders name files that do not exist, which every command must say in one line;
`serve BASE --adapter legal=A1` crashed at start before anything was read, issue 39's first defect)."""

from __future__ import annotations

import shlex

import pytest
import typer
from conftest import REPO

from llmctl.cli import app


def tour_commands() -> list[list[str]]:
    """The command lines of the README's tour and of every code block in docs/, as argument lists: comments
    dropped, `[optional parts]` kept (their flags are documented too), and `a | b` alternatives each a
    command of the same group."""
    blocks = [(REPO / "README.md").read_text().split("## A tour of the CLI", 1)[1].split("```", 2)[1]]
    for page in sorted((REPO / "docs").glob("*.md")):
        blocks += page.read_text().split("```")[1::2]  # the inside of each fenced block
    commands = []
    for line in (line for block in blocks for line in block.splitlines()):
        line = line.split("  #", 1)[0].strip()
        if not line.startswith("llmctl "):
            continue
        line = line.replace("[", "").replace("]", "").replace(" ...", "")
        first, *alternatives = (part.strip() for part in line.split(" | "))
        arguments = shlex.split(first)[1:]
        commands.append(arguments)
        commands += [[arguments[0], *shlex.split(alternative)] for alternative in alternatives]
    return commands


TOUR = tour_commands()


def parse(command, arguments: list[str], parent=None, name: str = "llmctl"):
    """Click's own parsing of the arguments, down the command groups, without running the command."""
    context = command.make_context(name, list(arguments), parent=parent)
    if hasattr(command, "resolve_command"):
        rest = [*getattr(context, "_protected_args", []), *context.args]
        sub_name, sub, remaining = command.resolve_command(context, rest)
        return parse(sub, remaining, context, sub_name)
    return context


def test_the_tour_has_the_commands_it_documents():
    assert len(TOUR) >= 40 and {arguments[0] for arguments in TOUR} >= {
        "corpus", "tokenize", "train", "finetune", "quantize", "distill", "eval", "chat", "serve", "export",
        "prune", "import", "models", "monitor", "report", "ab", "plugins",
    }  # fmt: skip


@pytest.mark.parametrize("arguments", TOUR, ids=" ".join)
def test_each_tour_line_parses_as_documented(arguments):
    parse(typer.main.get_command(app), arguments)


def test_a_renamed_flag_fails_the_parse():
    with pytest.raises(Exception, match="No such option: --scrub-pi"):  # typer's own copy of click raises it
        parse(typer.main.get_command(app), ["corpus", "build", "docs/", "--out", "c", "--scrub-pi"])


# lines that would start work that outlives the call where their inputs exist: none here (the placeholders
# do not), but a TUI or a launcher is skipped rather than risked
NOT_RUN = {"monitor", "torchrun"}


@pytest.mark.parametrize("arguments", [a for a in TOUR if a[0] not in NOT_RUN], ids=" ".join)
def test_each_tour_line_runs_to_a_result_or_one_error_line(
    arguments, llmctl_in_process, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # the placeholders (CKPT, docs/, recipes/...) name nothing here
    result = llmctl_in_process(*arguments)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode in (0, 2), (result.returncode, result.stderr)
    if result.returncode == 2:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
