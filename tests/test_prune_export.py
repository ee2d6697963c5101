"""`llmctl prune` and `llmctl export --format gguf`: the pattern every pruned weight has, recovery that keeps
it, and a GGUF file with llama.cpp's names, the checkpoint's values and the tokenizer inside."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch
from conftest import llama_cpp_greedy
from test_finetune import CPU, finetune_dict, write_examples

from llmctl.checkpoint import latest_checkpoint, open_checkpoint
from llmctl.compress.prune import magnitude_mask, prune_model
from llmctl.errors import UserError
from llmctl.quantization.quantize import block_linear_names
from llmctl.recipe import recipe_from_dict
from llmctl.train.finetune import FinetuneTrainer, finetune_recipe

gguf = pytest.importorskip("gguf", reason="GGUF export needs the export extra (gguf)")


def heldout_file(tmp_path):
    path = tmp_path / "held.txt"
    path.write_text("The daemon listens on a socket and answers each request in turn.\n" * 30)
    return path


def run_compress(llmctl, command: str, source, out, tmp_path, *options: str):
    """`llmctl prune|export SOURCE --out OUT --heldout (a small text)` that must succeed."""
    return llmctl(
        command,
        str(source),
        "--out",
        str(out),
        "--heldout",
        str(heldout_file(tmp_path)),
        *options,
        check=True,
    )


def test_two_four_pruning_leaves_exactly_two_zeros_in_every_four_inputs(llmctl, tiny_checkpoint, tmp_path):
    out = tmp_path / "pruned"
    result = run_compress(llmctl, "prune", tiny_checkpoint, out, tmp_path, "--method", "2:4")
    assert "measured sparsity per layer" in result.stdout and "50.00%" in result.stdout
    model, _ = open_checkpoint(out)
    source, _ = open_checkpoint(tiny_checkpoint)
    for name in block_linear_names(model):
        weight = model.get_submodule(name).weight
        zeros = (weight == 0).reshape(weight.shape[0], -1, 4).sum(dim=-1)
        assert torch.equal(zeros, torch.full_like(zeros, 2)), name
        original = source.get_submodule(name).weight.reshape(weight.shape[0], -1, 4).abs()
        kept = (weight != 0).reshape_as(original)
        # the two kept are the two largest of their four
        assert torch.all(
            original.masked_fill(~kept, float("inf")).amin(-1) >= original.masked_fill(kept, 0).amax(-1)
        )
    assert torch.equal(model.lm_head.weight, source.lm_head.weight)  # the head is not pruned


def test_magnitude_pruning_zeroes_the_smallest_fraction_of_each_layer(tiny_checkpoint):
    model, _ = open_checkpoint(tiny_checkpoint)
    original = {name: model.get_submodule(name).weight.detach().clone() for name in block_linear_names(model)}
    measured = prune_model(model, "magnitude", 0.3)
    for name, weight in original.items():
        assert measured[name] == pytest.approx(0.3, abs=1 / weight.numel())
        pruned = model.get_submodule(name).weight
        assert weight[pruned == 0].abs().max() <= weight[pruned != 0].abs().min()
    assert magnitude_mask(torch.randn(4, 4), 0.0).all()
    with pytest.raises(ValueError, match="sparsity must be in"):
        prune_model(model, "magnitude", 1.0)


def test_recovery_finetuning_keeps_the_pruned_weights_at_zero(tiny_checkpoint, tmp_path):
    from llmctl.checkpoint import save_checkpoint
    from llmctl.model.hf_format import export_state_dict

    model, tokenizer = open_checkpoint(tiny_checkpoint)
    prune_model(model, "2:4")
    pruned = save_checkpoint(tmp_path / "pruned", model.config, export_state_dict(model), tokenizer=tokenizer)
    examples = write_examples(tmp_path / "examples.jsonl")
    raw = finetune_dict(pruned, examples, tmp_path / "run", "full", steps=6)
    raw["finetune"]["keep_sparsity"] = True
    trainer = FinetuneTrainer(finetune_recipe(recipe_from_dict(raw)), CPU)
    before = trainer.evaluate()
    result = trainer.fit()
    assert result.val_loss < before
    recovered, _ = open_checkpoint(latest_checkpoint(tmp_path / "run"))
    start, _ = open_checkpoint(pruned)
    for name in block_linear_names(recovered):
        weight, zero = recovered.get_submodule(name).weight, start.get_submodule(name).weight == 0
        assert torch.all(weight[zero] == 0), name
        assert not torch.equal(weight, start.get_submodule(name).weight), name  # the rest did train
    raw["optim"] = {**raw.get("optim", {}), "name": "muon"}
    with pytest.raises(UserError, match='keep_sparsity needs optim.name = "adamw"'):
        FinetuneTrainer(finetune_recipe(recipe_from_dict(raw)), CPU)


def test_a_gguf_export_holds_llama_cpp_names_the_weights_and_the_tokenizer(llmctl, tiny_checkpoint, tmp_path):
    from sentencepiece import SentencePieceProcessor, sentencepiece_model_pb2

    from llmctl.compress.gguf_export import _rope_halves, read_gguf_model
    from llmctl.data.tokenizer import open_tokenizer

    out = tmp_path / "tiny.gguf"
    result = run_compress(llmctl, "export", tiny_checkpoint, out, tmp_path, "--type", "f16")
    assert "gguf f16" in result.stdout
    model, tokenizer = open_checkpoint(tiny_checkpoint)
    config = model.config
    reader = gguf.GGUFReader(str(out))
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    expected = {"token_embd.weight", "output_norm.weight", "output.weight"}
    for layer in range(config.n_layer):
        expected |= {
            f"blk.{layer}.{part}.weight"
            for part in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")
        }  # fmt: skip
    assert set(tensors) == expected
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["llama.attention.head_count_kv"].contents() == config.kv_heads

    hf = {
        "blk.0.attn_q.weight": ("model.layers.0.self_attn.q_proj.weight", config.n_head),
        "blk.0.attn_k.weight": ("model.layers.0.self_attn.k_proj.weight", config.kv_heads),
        "blk.1.ffn_down.weight": ("model.layers.1.mlp.down_proj.weight", None),
        "token_embd.weight": ("model.embed_tokens.weight", None),
        "output_norm.weight": ("model.norm.weight", None),
    }
    state = model.state_dict()
    for gguf_name, (hf_name, heads) in hf.items():
        tensor = tensors[gguf_name]
        values = torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type).copy())
        values = values.reshape(tuple(int(d) for d in reversed(tensor.shape))).float()
        assert values.shape == state[hf_name].shape
        if heads:
            values = _rope_halves(values, heads)
        reference = state[hf_name] if values.dim() == 1 else state[hf_name].half().float()
        assert torch.equal(values, reference), gguf_name  # f16 rounding, nothing else

    # the vocabulary in the file, put back into a sentencepiece model, encodes as llmctl's tokenizer does
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(tokenizer.path.read_bytes())
    pieces = reader.fields["tokenizer.ggml.tokens"].contents()
    scores = reader.fields["tokenizer.ggml.scores"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    del proto.pieces[:]
    for piece, score, kind in zip(pieces, scores, types, strict=True):
        proto.pieces.add(piece=piece, score=score, type=kind)
    rebuilt = SentencePieceProcessor(model_proto=proto.SerializeToString())
    sample = "Configure the daemon:\n\n  port = 8080  # naïve — “quoted” 日本\n"
    assert rebuilt.encode(sample) == open_tokenizer(tiny_checkpoint).encode(sample)
    assert reader.fields["tokenizer.ggml.model"].contents() == "llama"

    # and the whole file read back (inverse permutation included) gives the checkpoint's logits
    ids = torch.tensor([[1, 40, 41, 42, 43, 44]])
    with torch.no_grad():
        torch.testing.assert_close(read_gguf_model(out)(ids), model(ids), atol=2e-2, rtol=2e-2)


def test_an_f32_export_reads_back_to_the_same_logits_and_q4_0_close(tiny_checkpoint, tmp_path):
    from llmctl.compress.gguf_export import read_gguf_model, write_gguf
    from llmctl.model.hf_format import export_state_dict

    model, tokenizer = open_checkpoint(tiny_checkpoint)
    ids = torch.tensor([[1, 40, 41, 42, 43, 44]])
    with torch.no_grad():
        reference = model(ids)
        for file_type, tolerance in (("f32", 1e-6), ("q8_0", 0.02), ("q4_0", 0.2)):
            path = tmp_path / f"{file_type}.gguf"
            write_gguf(path, model.config, export_state_dict(model), tokenizer.path, file_type, "tiny")
            logits = read_gguf_model(path)(ids)
            assert float((logits - reference).norm() / reference.norm()) <= tolerance, file_type


def test_export_refuses_bad_input_with_one_line(llmctl_in_process, tiny_checkpoint, tmp_path):
    held = heldout_file(tmp_path)
    out = tmp_path / "x.gguf"
    for options, message in (
        (["--type", "q3_k"], "unknown GGUF type 'q3_k'"),
        (["--format", "tflite"], "unknown export format 'tflite'"),
    ):
        result = llmctl_in_process(
            "export", str(tiny_checkpoint), "--out", str(out), "--heldout", str(held), *options
        )
        assert result.returncode == 2 and message in result.stderr
        assert not out.exists()


def test_llama_cpp_generates_what_llmctl_generates_from_the_export(tiny_checkpoint, tmp_path):
    llama_cpp = pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is an optional extra (llmctl[llama])"
    )
    from llmctl.compress.gguf_export import write_gguf
    from llmctl.infer.generate import generate_ids
    from llmctl.infer.sampling import SamplingParams
    from llmctl.model.hf_format import export_state_dict

    model, tokenizer = open_checkpoint(tiny_checkpoint)
    path = tmp_path / "f32.gguf"
    write_gguf(path, model.config, export_state_dict(model), tokenizer.path, "f32", "tiny")
    prompt = tokenizer.encode("The daemon listens on a socket")
    ours = list(generate_ids(model, [tokenizer.bos_id, *prompt], SamplingParams(16, temperature=0)))
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=2, verbose=False)
    try:
        assert llm.tokenize(b"The daemon listens on a socket", add_bos=False) == prompt
        theirs = llama_cpp_greedy(llm, [tokenizer.bos_id, *prompt], 16)
    finally:
        llm.close()
    assert theirs == ours


def test_a_file_llama_cpp_cannot_run_is_a_reason_not_a_crash(tmp_path):
    """llama.cpp is timed in a process of its own: a file it fails on (or crashes on: 0.3.36 segfaults on
    repacked Q8_0 weights on an AVX-512 CPU) gives no speed and its reason, and llmctl goes on."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is an optional extra (llmctl[llama])")
    from llmctl.compress.run import llama_cpp_decode_speed

    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + bytes(60))
    speed, note = llama_cpp_decode_speed(broken)
    assert speed is None and note.startswith("decode speed: llama.cpp failed (")


def test_timing_llama_cpp_leaves_no_openmp_threads_behind(tiny_checkpoint, tmp_path):
    """llama.cpp shares torch's libgomp: a pool left on the caller's thread, which lives on, would slow every
    later torch step there. The caller here is a fresh thread, as the benchmarks' threads are."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is an optional extra (llmctl[llama])")
    from llmctl.compress.gguf_export import write_gguf
    from llmctl.compress.run import llama_cpp_decode_speed
    from llmctl.model.hf_format import export_state_dict

    model, tokenizer = open_checkpoint(tiny_checkpoint)
    path = tmp_path / "f32.gguf"
    write_gguf(path, model.config, export_state_dict(model), tokenizer.path, "f32", "tiny")
    speeds, release = [], threading.Event()

    def caller() -> None:
        speeds.append(llama_cpp_decode_speed(path)[0])
        release.wait()

    threads = len(os.listdir("/proc/self/task"))
    thread = threading.Thread(target=caller)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not speeds or len(os.listdir("/proc/self/task")) > threads + 1:  # the caller itself is one
            assert time.monotonic() < deadline, "threads left behind by llama.cpp"
            time.sleep(0.05)
    finally:
        release.set()
        thread.join()
    assert speeds[0] is not None and speeds[0] > 0
