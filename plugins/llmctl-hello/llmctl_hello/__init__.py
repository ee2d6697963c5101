"""An example llmctl plugin: one Typer app registered under the `llmctl.commands` entry-point group."""

import typer

app = typer.Typer(add_completion=False)


@app.command()
def hello(name: str = typer.Option("world", help="Who to greet.")) -> None:
    """Greet someone (an example third-party command)."""
    typer.echo(f"Hello, {name}! (from the llmctl-hello plugin)")
