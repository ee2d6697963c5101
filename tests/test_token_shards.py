"""Token files per corpus shard (`tokenize encode --per-shard`): the loader reads them as one stream, so
training sees bitwise the batches of the single concatenated file, and resumes exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import SAMPLE, tiny_recipe_dict

from llmctl.checkpoint import list_checkpoints
from llmctl.data.corpus import CorpusOptions, build_corpus
from llmctl.data.loader import TokenFile, WindowSampler
from llmctl.data.token_files import encode_corpus
from llmctl.errors import UserError
from llmctl.model.hf_format import read_state_dict
from llmctl.recipe import recipe_from_dict
from llmctl.train.distributed import DistributedContext
from llmctl.train.events import StepLogged
from llmctl.train.trainer import Trainer

CPU = DistributedContext(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def two_layouts(sample_pipeline, tmp_path_factory) -> dict:
    """The sample corpus in many small shards, encoded as one file per split and as one file per shard."""
    root = tmp_path_factory.mktemp("layouts")
    corpus = root / "corpus"
    options = CorpusOptions(val_fraction=0.1, shard_bytes=96 << 10)
    build_corpus([str(SAMPLE / "train.jsonl"), str(SAMPLE / "val.jsonl")], corpus, options)
    tokenizer = sample_pipeline["tokenizer"]
    encode_corpus(corpus, tokenizer, root / "single")
    meta = encode_corpus(corpus, tokenizer, root / "sharded", per_shard=True)
    return {"single": root / "single", "sharded": root / "sharded", "meta": meta, "root": root}


def test_the_shard_files_are_the_single_file_cut_at_shard_boundaries(two_layouts):
    meta = two_layouts["meta"]
    assert len(meta["shards"]["train"]) >= 10  # a window often spans two
    single = np.fromfile(two_layouts["single"] / "train.bin", dtype=meta["dtype"])
    pieces = [
        np.fromfile(two_layouts["sharded"] / s["file"], dtype=meta["dtype"]) for s in meta["shards"]["train"]
    ]
    assert np.array_equal(np.concatenate(pieces), single)
    assert [len(piece) for piece in pieces] == [s["tokens"] for s in meta["shards"]["train"]]
    assert meta["tokens"]["train"] == len(single)

    sharded = TokenFile(two_layouts["sharded"], "train")
    assert len(sharded) == len(single)
    boundaries = np.cumsum([len(piece) for piece in pieces])[:-1]
    for start in [0, *(boundaries - 5), *(boundaries - 64), len(single) - 65]:
        assert np.array_equal(sharded.window(int(start), 64), single[start : start + 65].astype(np.int64))


def test_training_batches_are_bitwise_those_of_the_single_file(two_layouts):
    samplers = [
        WindowSampler(TokenFile(two_layouts[layout], "train"), 64, 8, seed=3)
        for layout in ("single", "sharded")
    ]
    windows = len(samplers[0].tokens) // 64
    for step in range(0, 3 * windows // 8, 7):  # across epochs, whose offsets shift the windows
        a, b = (sampler.micro_batch(step, 1, 1, 2, 2) for sampler in samplers)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_a_run_on_shard_files_resumes_exactly_and_matches_the_single_file_run(two_layouts, sample_pipeline):
    root = two_layouts["root"]

    def recipe(layout: str, run: str):
        values = tiny_recipe_dict(sample_pipeline, root / run, steps=8)
        values["data"]["tokens"] = str(two_layouts[layout])
        return recipe_from_dict(values)

    Trainer(recipe("single", "single-run"), CPU).fit()
    first = Trainer(recipe("sharded", "sharded-run"), CPU)

    def stop_at_half(event):
        if isinstance(event, StepLogged) and event.step == 4:
            first.stop_requested = True

    first.on_event = stop_at_half
    assert first.fit().interrupted
    Trainer(recipe("sharded", "sharded-run"), CPU).fit(resume="auto")
    final = read_state_dict(list_checkpoints(root / "sharded-run")[-1][1])
    reference = read_state_dict(list_checkpoints(root / "single-run")[-1][1])
    assert all(torch.equal(final[name], reference[name]) for name in reference)


def test_a_missing_or_truncated_shard_file_is_one_clear_error(two_layouts, tmp_path):
    import shutil

    copy = shutil.copytree(two_layouts["sharded"], tmp_path / "tokens")
    meta = json.loads((copy / "meta.json").read_text())
    victim = copy / meta["shards"]["train"][3]["file"]
    victim.write_bytes(victim.read_bytes()[:-2])
    with pytest.raises(UserError, match=f"{victim.name} has .* bytes where meta.json promises"):
        TokenFile(copy, "train")
    victim.unlink()
    with pytest.raises(UserError, match=f"{victim.name} is missing"):
        TokenFile(copy, "train")


def test_corpus_plan_scales_the_measured_rates_to_the_token_budget(
    sample_pipeline, llmctl_in_process, tmp_path
):
    from llmctl.data.plan import plan_corpus

    corpus, tokens_dir = sample_pipeline["corpus"], sample_pipeline["tokens"]
    manifest = json.loads((corpus / "manifest.json").read_text())
    meta = json.loads((tokens_dir / "meta.json").read_text())
    one = plan_corpus(105e9, corpus, tokens_dir, nodes=1, vocab_size=None)
    kept = sum(split["bytes"] for split in manifest["splits"].values())
    per_token = meta["text_bytes"] / sum(meta["tokens"].values())
    assert one.raw_text_bytes == pytest.approx(105e9 * per_token * manifest["input_bytes"] / kept)
    assert one.build_hours_per_node == pytest.approx(
        one.raw_text_bytes / 1e6 / manifest["mb_per_second"] / 3600
    )
    assert one.token_disk_bytes == 105e9 * 2  # vocabulary 1024: uint16
    eight = plan_corpus(105e9, corpus, tokens_dir, nodes=8, vocab_size=100_000)
    assert eight.encode_hours_per_node == pytest.approx(one.encode_hours_per_node / 8)
    assert eight.token_disk_bytes == 105e9 * 4

    shown = llmctl_in_process("corpus", "plan", "--tokens", "105e9", "--corpus", str(corpus), "--tokens-dir", str(tokens_dir),
                   check=True).stdout  # fmt: skip
    assert "raw text needed" in shown and "h per node" in shown
    missing = llmctl_in_process(
        "corpus", "plan", "--tokens", "1e9", "--corpus", str(corpus), "--tokens-dir", str(tmp_path)
    )
    assert missing.returncode == 2 and "has no meta.json" in missing.stderr


def test_encoding_on_the_datatrove_engine_writes_the_same_files_and_index(
    two_layouts, sample_pipeline, llmctl_in_process
):
    pytest.importorskip("datatrove", reason="the distributed extra")
    corpus, out = two_layouts["root"] / "corpus", two_layouts["root"] / "engine"
    command = ["tokenize", "encode", str(corpus), "-t", str(sample_pipeline["tokenizer"]), "--out", str(out)]
    result = llmctl_in_process(*command, "--per-shard", "--executor", "local", "--tasks", "3", check=True)
    assert "up to date" not in result.stdout
    meta, reference = json.loads((out / "meta.json").read_text()), two_layouts["meta"]
    for key in ("shards", "tokens", "documents", "text_bytes", "fingerprint", "stream", "dtype"):
        assert meta[key] == reference[key], key
    for split in ("train", "val"):
        for shard in meta["shards"][split]:
            assert (out / shard["file"]).read_bytes() == (two_layouts["sharded"] / shard["file"]).read_bytes()
    assert (
        sorted(path.name for path in out.parent.iterdir() if "datatrove" in path.name) == []
    )  # work removed
    assert (
        "up to date" in llmctl_in_process(*command, "--per-shard", check=True).stdout
    )  # the same layout, either way

    refused = llmctl_in_process(*command[:-1], str(out.parent / "x"), "--executor", "local")
    assert (
        refused.returncode == 2
        and "--executor writes one token file per shard: add --per-shard" in refused.stderr
    )
    refused = llmctl_in_process(*command[:-1], str(out.parent / "x"), "--per-shard", "--executor", "slurm")
    assert refused.returncode == 2 and "--executor slurm needs partition and time" in refused.stderr
    assert not (out.parent / "x").exists()
