"""The compression runs behind `llmctl quantize` (and prune / export): open the source, transform it,
write the artefact atomically, then measure source and artefact the same way for one comparison table."""

from __future__ import annotations

import gc
import importlib.util
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from llmctl.checkpoint import is_adapter, open_checkpoint, save_checkpoint
from llmctl.compress.calibration import calibration_windows
from llmctl.compress.gptq import gptq_layers
from llmctl.compress.measure import (
    DECODE_PROMPT,
    DECODE_TOKENS,
    ArtefactReport,
    best_tokens_per_second,
    measure_model,
)
from llmctl.data.tokenizer_base import Tokenizer
from llmctl.errors import UserError
from llmctl.infer.decode import compile_decode, load_for_inference
from llmctl.model import Transformer
from llmctl.model.hf_format import CONFIG_FILE, export_state_dict, read_quantization_config
from llmctl.quantization.quantize import (
    QuantizationSettings,
    dequantize_model,
    dequantized_state,
    quantize_model,
    quantized_linear_names,
)

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Calibration:
    texts: list[str]
    windows: int = 128
    window_length: int = 256


def open_source(path: Path, quantized: bool = False) -> tuple[Transformer, Tokenizer]:
    """A checkpoint to compress; a LoRA adapter is merged into its base first. A quantized one is refused
    unless `quantized` (export writes what it holds)."""
    path = Path(path)
    if is_adapter(path):
        from llmctl.adapters import open_adapted

        return open_adapted(path)
    if not quantized and (path / CONFIG_FILE).is_file() and read_quantization_config(path) is not None:
        raise UserError(f"{path} is already quantized; start from the float checkpoint it was made from")
    return open_checkpoint(path)


def measure_artefacts(
    artefacts: list[tuple[str, Path]], heldout: list[str], progress: Progress, compile: bool = False
) -> list[ArtefactReport]:
    """Each artefact loaded as chat and serve load it (`compile`: with `--compile`'s decode step), measured,
    and freed before the next."""
    reports = []
    for label, path in artefacts:
        model, tokenizer = load_for_inference(path)
        if compile:
            compile_decode(model)
        reports.append(measure_model(label, path, model, tokenizer, heldout, progress))
        del model
        gc.collect()
    return reports


def write_quantized(
    source: Path,
    out: Path,
    settings: QuantizationSettings,
    calibration: Calibration | None = None,
    progress: Progress = lambda message: None,
) -> None:
    """Quantize `source` into the checkpoint directory `out`: GPTQ when given calibration text, else
    round-to-nearest; the settings and the source are recorded in its config.json."""
    settings = replace(settings, algorithm="rtn" if calibration is None else "gptq")
    model, tokenizer = open_source(source)
    if settings.method == "int4":
        widths = {model.get_submodule(name).in_features for name in quantized_linear_names(model, settings)}
        if any(width % settings.group_size for width in widths):
            raise UserError(
                f"int4 group size {settings.group_size} does not divide the model's layer widths "
                f"{sorted(widths)}; pick a --group-size from 32, 64, 128 that does"
            )
    prepared = None
    record = {**settings.to_config(), "source": str(source)}
    if calibration is not None:
        length = min(calibration.window_length, model.config.max_seq_len)
        windows = calibration_windows(calibration.texts, tokenizer, calibration.windows, length)
        prepared = gptq_layers(model, settings, windows, progress)
        record["calibration"] = {"windows": len(windows), "window_length": length}
    quantize_model(model, settings, prepared)
    save_checkpoint(
        out, model.config, export_state_dict(model), tokenizer=tokenizer, quantization_config=record
    )
    progress(f"wrote {out}")


def quantize_checkpoint(
    source: Path,
    out: Path,
    settings: QuantizationSettings,
    heldout: list[str],
    calibration: Calibration | None = None,
    progress: Progress = lambda message: None,
    compile: bool = False,
) -> list[ArtefactReport]:
    """`write_quantized`, then the source's and the result's reports (decode timed compiled with `compile`)."""
    write_quantized(source, out, settings, calibration, progress)
    gc.collect()
    artefacts = [("source", Path(source)), (settings.method, Path(out))]
    return measure_artefacts(artefacts, heldout, progress, compile)


def export_gguf(
    source: Path, out: Path, file_type: str, heldout: list[str], progress: Progress = lambda message: None
) -> list[ArtefactReport]:
    """Write `source` (float, adapter or quantized) as one GGUF file; the source's and the file's reports."""
    from llmctl.compress.gguf_export import write_gguf
    from llmctl.data.chat_template import find_chat_template

    model, tokenizer = open_source(source, quantized=True)
    config = model.config
    template = find_chat_template(Path(source)) or find_chat_template(tokenizer.path.parent)
    write_gguf(out, config, dequantized_state(model), tokenizer.path, file_type, Path(source).name, template)
    progress(f"wrote {out}")
    del model
    gc.collect()
    source_report = measure_artefacts([("source", Path(source))], heldout, progress)
    return [*source_report, measure_export(out, f"gguf {file_type}", tokenizer, heldout, progress)]


def export_onnx(
    source: Path, out: Path, heldout: list[str], progress: Progress = lambda message: None
) -> list[ArtefactReport]:
    """Write `source` (float, adapter or quantized: exported from its dequantized weights) as an ONNX
    directory with KV-cache inputs and outputs; the source's and the export's reports."""
    from llmctl.compress.onnx_export import write_onnx

    model, tokenizer = open_source(source, quantized=True)
    progress("exporting to ONNX with torch.onnx (tens of seconds)")
    write_onnx(out, dequantize_model(model), tokenizer)
    progress(f"wrote {out}")
    del model
    gc.collect()
    source_report = measure_artefacts([("source", Path(source))], heldout, progress)
    return [*source_report, measure_export(out, "onnx", tokenizer, heldout, progress)]


def measure_export(
    path: Path,
    label: str,
    tokenizer: Tokenizer,
    heldout: list[str],
    progress: Progress = lambda message: None,
) -> ArtefactReport:
    """An export measured on its own weights in its own runtime: perplexity (with llmctl's evaluation) of a
    GGUF file's dequantized tensors or of onnxruntime's logits for an ONNX directory, and batch-1 decode
    speed of llama.cpp (where llama-cpp-python is installed) or onnxruntime, timed as llmctl's is."""
    if Path(path).is_dir():
        from llmctl.compress.onnx_export import OnnxCausalLM

        model = OnnxCausalLM(path)
        report = measure_model(label, path, model, tokenizer, heldout, progress, decode=False)
        report.decode_tokens_per_second = best_tokens_per_second(
            lambda: len(model.greedy(DECODE_PROMPT, DECODE_TOKENS))
        )
        report.note = "decode speed: onnxruntime"
        return report
    from llmctl.compress.gguf_export import read_gguf_model

    model = read_gguf_model(path)
    report = measure_model(label, path, model, tokenizer, heldout, progress, decode=False)
    report.decode_tokens_per_second, report.note = llama_cpp_decode_speed(path)
    return report


def llama_cpp_decode_speed(path: Path) -> tuple[float | None, str]:
    """Batch-1 greedy tokens/s of llama.cpp on the file (llama-cpp-python, 2 threads), or why not, measured in
    a process of its own (`llmctl.compress.llama_cpp_timing`); a crash is retried with weights not repacked."""
    if importlib.util.find_spec("llama_cpp") is None:
        return None, "decode speed: install llama-cpp-python (pip install 'llmctl[llama]') to measure it"
    command = [sys.executable, "-m", "llmctl.compress.llama_cpp_timing", str(path)]
    for extra, note in (
        ([], ""),
        (["--no-repack"], " (weights not repacked: llama.cpp crashed repacking them)"),
    ):
        result = subprocess.run([*command, *extra], capture_output=True, text=True)
        if result.returncode == 0:
            return float(result.stdout.split()[-1]), "decode speed: llama.cpp" + note
    reason = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
    return None, f"decode speed: llama.cpp failed ({reason})"


def prune_checkpoint(
    source: Path,
    out: Path,
    method: str,
    sparsity: float,
    heldout: list[str],
    progress: Progress = lambda message: None,
) -> tuple[list[ArtefactReport], dict[str, float]]:
    """Prune `source` into the checkpoint `out`; the source's and the result's reports, and the measured
    sparsity of every pruned layer."""
    from llmctl.compress.prune import prune_model

    model, tokenizer = open_source(source)
    try:
        sparsities = prune_model(model, method, sparsity)
    except ValueError as error:
        raise UserError(str(error)) from None
    save_checkpoint(out, model.config, export_state_dict(model), tokenizer=tokenizer)
    progress(f"wrote {out}")
    del model
    gc.collect()
    label = "2:4" if method == "2:4" else f"magnitude {sparsity:.0%}"
    return measure_artefacts([("source", Path(source)), (label, Path(out))], heldout, progress), sparsities
