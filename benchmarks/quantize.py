"""Quantization against llama.cpp on the same weights, one run: size on disk, held-out perplexity and batch-1
greedy decode tokens/s of llmctl fp32 / int8 / int4 (group 64), eager and with the compiled decode step
(`serve --compile`), of llama.cpp on GGUF f32 / q8_0 / q4_0 exports and of onnxruntime on the ONNX export,
with this machine's memory-bandwidth bound.

    .venv/bin/python -m benchmarks.quantize [--checkpoint CKPT] [--heldout DATA] [--calibrate DATA]

Without --checkpoint it builds the 134M shape (d768 x 12, vocab 32k) with random weights: sizes and speeds
are the real ones, perplexity then only shows quantization noise. Give a trained checkpoint for quality.
llama.cpp columns need `pip install 'llmctl[llama]'` (llama-cpp-python, built from source).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from benchmarks.common import machine, memory_bandwidth, sample_tokenizer
from llmctl.checkpoint import open_checkpoint, save_checkpoint
from llmctl.compress.gguf_export import write_gguf
from llmctl.compress.measure import heldout_texts
from llmctl.compress.onnx_export import write_onnx
from llmctl.compress.run import Calibration, measure_artefacts, measure_export, write_quantized
from llmctl.evaluate.runner import read_texts
from llmctl.model import ModelConfig, Transformer
from llmctl.model.hf_format import export_state_dict
from llmctl.quantization.quantize import QuantizationSettings

SAMPLE = Path(__file__).resolve().parent.parent / "data" / "sample"
SHAPE = ModelConfig(vocab_size=32000, d_model=768, n_layer=12, n_head=12, max_seq_len=1024)


def random_134m(work: Path) -> Path:
    tokenizer = sample_tokenizer(work)
    torch.manual_seed(0)
    model = Transformer(SHAPE)
    return save_checkpoint(work / "fp32", SHAPE, export_state_dict(model), tokenizer=tokenizer)


def greedy_agreement(source: Path, gguf_file: Path, tokens: int = 32) -> str:
    """Whether llama.cpp's greedy continuation of the f32 export equals llmctl's on the checkpoint."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return "greedy agreement with llama.cpp: not measured (llama-cpp-python not installed)"
    from llmctl.infer.generate import generate_ids
    from llmctl.infer.sampling import SamplingParams

    model, tokenizer = open_checkpoint(source)
    prompt = [tokenizer.bos_id, *tokenizer.encode("The configuration file lists")]
    ours = list(generate_ids(model, prompt, SamplingParams(tokens, temperature=0)))
    llm = Llama(model_path=str(gguf_file), n_ctx=256, n_threads=2, verbose=False)
    try:
        theirs = []
        for token in llm.generate(prompt, top_k=1, temp=0.0):
            theirs.append(token)
            if len(theirs) == tokens:
                break
    finally:
        llm.close()
    same = sum(a == b for a, b in zip(ours, theirs, strict=True))
    return f"greedy agreement with llama.cpp on the f32 export: {same}/{tokens} tokens identical"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", type=Path, help="a trained checkpoint (default: a random 134M)")
    parser.add_argument("--heldout", type=Path, default=SAMPLE / "val.jsonl")
    parser.add_argument("--heldout-tokens", type=int, default=4000)
    parser.add_argument("--calibrate", type=Path, help="GPTQ calibration text for the int4 row")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp())
    source = args.checkpoint or random_134m(work)
    texts = heldout_texts(read_texts(args.heldout), args.heldout_tokens)
    calibration = Calibration(read_texts(args.calibrate, split="train"), 64) if args.calibrate else None

    write_quantized(source, work / "int8", QuantizationSettings("int8"))
    write_quantized(source, work / "int4", QuantizationSettings("int4", 64), calibration)
    model, tokenizer = open_checkpoint(source)
    for file_type in ("f32", "q8_0", "q4_0"):
        write_gguf(
            work / f"{file_type}.gguf",
            model.config,
            export_state_dict(model),
            tokenizer.path,
            file_type,
            "bench",
        )
    write_onnx(work / "onnx", model, tokenizer)
    config = model.config
    del model

    bandwidth = memory_bandwidth()
    llmctl_artefacts = [("fp32", Path(source)), ("int8", work / "int8"), ("int4 g64", work / "int4")]
    reports = measure_artefacts([(f"llmctl {label}", path) for label, path in llmctl_artefacts], texts, print)
    reports += measure_artefacts(
        [(f"compiled {label}", path) for label, path in llmctl_artefacts], texts, print, compile=True
    )
    reports += [measure_export(work / "onnx", "onnxruntime fp32", tokenizer, texts, print)]
    reports += [
        measure_export(work / f"{kind}.gguf", f"llama.cpp {kind}", tokenizer, texts, print)
        for kind in ("f32", "q8_0", "q4_0")
    ]
    print(f"\nmachine: {machine()}; measured read bandwidth {bandwidth / 1e9:.1f} GB/s")
    print(
        f"model: {config.num_parameters() / 1e6:.1f}M parameters, d{config.d_model} x {config.n_layer}, vocab "
        f"{config.vocab_size}; {'trained: ' + str(source) if args.checkpoint else 'random weights'}; "
        f"held-out: {args.heldout} ({len(texts)} documents); int4 {'GPTQ' if calibration else 'round-to-nearest'}"
    )
    print(f"{'artefact':18}{'size MiB':>10}{'perplexity':>12}{'decode tok/s':>14}{'bound tok/s':>13}")
    by_label = {report.label: report for report in reports}
    for report in reports:
        speed = report.decode_tokens_per_second
        bound = bandwidth / report.size_bytes
        print(
            f"{report.label:18}{report.size_bytes / 2**20:>10,.1f}{report.perplexity:>12.3f}"
            f"{f'{speed:,.1f}' if speed else '-':>14}{bound:>13,.1f}"
            + (f"  ({report.note})" if speed is None and report.note else "")
        )

    def ratio(a: str, b: str) -> str:
        x, y = by_label[a].decode_tokens_per_second, by_label[b].decode_tokens_per_second
        return f"{x / y:.2f}x" if x and y else "n/a (llama.cpp not installed)"

    print(greedy_agreement(Path(source), work / "f32.gguf"))
    fp32, int8, int4 = (by_label[label] for label in ("llmctl fp32", "llmctl int8", "llmctl int4 g64"))
    for step in ("llmctl", "compiled"):
        print(
            f"{step}: int8 / fp32 decode: {ratio(f'{step} int8', f'{step} fp32')} (target >= 1.8x); "
            f"int8 / llama.cpp q8_0: {ratio(f'{step} int8', 'llama.cpp q8_0')} (target >= 0.6x); "
            f"int4 / int8: {ratio(f'{step} int4 g64', f'{step} int8')} (target > 1x)"
        )
    print(
        f"fp32 / int4 size: {fp32.size_bytes / int4.size_bytes:.2f}x (target >= 3.5x); "
        f"int8 perplexity {int8.change_against(fp32):+.2%}, int4 {int4.change_against(fp32):+.2%}; "
        f"onnxruntime fp32 / llmctl compiled fp32 decode: {ratio('onnxruntime fp32', 'compiled fp32')}"
    )


if __name__ == "__main__":
    main()
