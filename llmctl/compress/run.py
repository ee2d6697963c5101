"""The compression runs behind `llmctl quantize` (and prune / export): open the source, transform it,
write the artefact atomically, then measure source and artefact the same way for one comparison table."""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from llmctl.checkpoint import is_adapter, open_checkpoint, save_checkpoint
from llmctl.compress.calibration import calibration_windows
from llmctl.compress.gptq import gptq_layers
from llmctl.compress.measure import ArtefactReport, measure_model
from llmctl.compress.quantize import QuantizationSettings, quantize_model
from llmctl.data.tokenizer import Tokenizer
from llmctl.errors import UserError
from llmctl.infer.decode import load_for_inference
from llmctl.model import Transformer
from llmctl.model.hf_format import export_state_dict, read_quantization_config

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Calibration:
    texts: list[str]
    windows: int = 128
    window_length: int = 256


def open_source(path: Path) -> tuple[Transformer, Tokenizer]:
    """A float checkpoint to compress; a LoRA adapter is merged into its base first."""
    path = Path(path)
    if is_adapter(path):
        from llmctl.adapters import open_adapted

        return open_adapted(path)
    if (path / "config.json").is_file() and read_quantization_config(path) is not None:
        raise UserError(f"{path} is already quantized; start from the float checkpoint it was made from")
    return open_checkpoint(path)


def measure_artefacts(
    artefacts: list[tuple[str, Path]], heldout: list[str], progress: Progress
) -> list[ArtefactReport]:
    """Each artefact loaded as chat and serve load it, measured, and freed before the next."""
    reports = []
    for label, path in artefacts:
        model, tokenizer = load_for_inference(path)
        reports.append(measure_model(label, path, model, tokenizer, heldout, progress))
        del model
        gc.collect()
    return reports


def quantize_checkpoint(
    source: Path,
    out: Path,
    settings: QuantizationSettings,
    heldout: list[str],
    calibration: Calibration | None = None,
    progress: Progress = lambda message: None,
) -> list[ArtefactReport]:
    """Quantize `source` into the checkpoint directory `out`; the source's and the result's reports."""
    settings = replace(settings, algorithm="rtn" if calibration is None else "gptq")
    model, tokenizer = open_source(source)
    prepared = None
    if calibration is not None:
        length = min(calibration.window_length, model.config.max_seq_len)
        windows = calibration_windows(calibration.texts, tokenizer, calibration.windows, length)
        prepared = gptq_layers(model, settings, windows, progress)
    quantize_model(model, settings, prepared)
    record = {**settings.to_config(), "source": str(source)}
    if calibration is not None:
        record["calibration"] = {"windows": len(windows), "window_length": length}
    save_checkpoint(
        out, model.config, export_state_dict(model), tokenizer=tokenizer, quantization_config=record
    )
    progress(f"wrote {out}")
    del model
    gc.collect()
    return measure_artefacts([("source", Path(source)), (settings.method, Path(out))], heldout, progress)
