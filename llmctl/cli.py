"""The `llmctl` root command. Every subcommand arrives through the `llmctl.commands` entry-point group."""

from __future__ import annotations

import sys

import typer
import typer.core
import typer.main
from rich.console import Console
from rich.markup import escape

from llmctl import __version__
from llmctl.atomic import NO_SPACE_ERRNOS
from llmctl.errors import UserError
from llmctl.plugins import CommandSource, discover, load

stderr = Console(stderr=True)


def warn(message: str) -> None:
    stderr.print(f"[yellow]warning:[/] {escape(message)}", highlight=False, soft_wrap=True)


class PluginGroup(typer.core.TyperGroup):
    """A command group that imports a subcommand's module only when that subcommand is asked for."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.sources, skipped = discover()
        for source in skipped:
            warn(f"plugin {source.package} {source.version}: command {source.status}")
        self.loaded: dict[str, typer.core.TyperCommand | typer.core.TyperGroup | None] = {}

    def list_commands(self, ctx) -> list[str]:
        return [*self.sources, *super().list_commands(ctx)]

    def get_command(self, ctx, cmd_name: str):
        if cmd_name not in self.sources:
            return super().get_command(ctx, cmd_name)
        if cmd_name not in self.loaded:
            self.loaded[cmd_name] = self._load(self.sources[cmd_name])
        return self.loaded[cmd_name]

    @staticmethod
    def _load(source: CommandSource):
        try:
            command = as_click_command(load(source))
        except Exception:
            warn(
                f"plugin {source.package} {source.version}: command `{source.name}` failed to load "
                f"({source.status.removeprefix('error: ')}); skipped"
            )
            return None
        command.name = source.name
        return command


def as_click_command(obj):
    """Entry points may name a Typer app or a plain function (wrapped as a one-command Typer app)."""
    if not isinstance(obj, typer.Typer):
        if not callable(obj):
            raise TypeError(f"{obj!r} is neither a Typer app nor a function")
        wrapper = typer.Typer(add_completion=False)
        wrapper.command()(obj)
        obj = wrapper
    return typer.main.get_command(obj)


app = typer.Typer(
    cls=PluginGroup,
    name="llmctl",
    help="From private domain text to a private, served language model.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"llmctl {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(
        False, "--version", "-V", callback=_print_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """From private domain text to a private, served language model."""


@app.command("plugins")
def plugins_command() -> None:
    """List every command with the package that provides it, its version and whether it loads."""
    from llmctl.commands.plugins import show_plugins

    show_plugins()


def main() -> None:
    command = typer.main.get_command(app)
    try:
        command.main(prog_name="llmctl")
    except UserError as error:
        stderr.print(f"[red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except OSError as error:
        if error.errno not in NO_SPACE_ERRNOS:
            raise
        where = f" writing {error.filename}" if error.filename else ""
        stderr.print(
            f"[red]error:[/] no space left on the device{escape(where)}; free space and run it again "
            "(outputs are replaced only when complete, so nothing was half-written)",
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(2)
    except KeyboardInterrupt:
        stderr.print("interrupted", highlight=False)
        sys.exit(130)


if __name__ == "__main__":
    main()
