"""`llmctl import MODEL.gguf --out DIR`: a GGUF file from llama.cpp or Ollama as a checkpoint directory."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(add_completion=False)


@app.command(name="import")
def import_command(
    gguf: Path = typer.Argument(..., help="A .gguf file (F32, F16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K ...)."),
    out: Path = typer.Option(..., "--out", "-o", help="The checkpoint directory to write (fp32 weights)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out directory."),
) -> None:
    """Dequantize a GGUF model into a checkpoint with tokenizer.json and its chat template, ready to chat,
    serve, finetune, quantize and export."""
    from llmctl.atomic import check_output
    from llmctl.compress.gguf_import import import_gguf
    from llmctl.model.hf_format import read_config

    check_output(out, [gguf], overwrite)
    written = import_gguf(gguf, out)
    config = read_config(written)
    typer.echo(
        f"imported {gguf} -> {written}: {config.family}, {config.num_parameters() / 1e6:.1f}M parameters, "
        f"{config.n_layer} layers, vocabulary {config.vocab_size}, context {config.max_seq_len}"
    )
