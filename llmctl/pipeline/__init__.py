"""`llmctl up`'s pipeline: the stages of the single commands, composed, budgeted and resumable. It sits above
the engines (it calls data, train, evaluate, compress and registry) and below the commands; it never imports
Typer or Rich."""
