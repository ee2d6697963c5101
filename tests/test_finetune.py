"""`llmctl finetune`: LoRA in PEFT's format, the base left untouched, loss masks, packing, resume, merge, and a
Hugging Face Llama directory with a `tokenizer.json` as the base."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, hf_llama_directory, one_error_line, random_adapter, run_llmctl

from llmctl.data.chat import END, Message
from llmctl.data.chat_format import MarkerFormat
from llmctl.data.instructions import (
    IGNORE,
    Example,
    example_window,
    pack_examples,
    read_examples,
    tokenize_example,
)
from llmctl.data.loader import window_batch
from llmctl.data.tokenizer import open_tokenizer
from llmctl.errors import UserError
from llmctl.recipe import recipe_from_dict
from llmctl.train.distributed import DistributedContext
from llmctl.train.finetune import FinetuneTrainer, finetune_plan, finetune_recipe
from llmctl.train.plan import make_plan

CPU = DistributedContext(0, 0, 1, torch.device("cpu"))


def write_examples(path, count: int = 48):
    with path.open("w") as out:
        for i in range(count):
            out.write(
                json.dumps({"prompt": f"Which port does service {i} use?", "completion": f"Port {8000 + i}."})
            )
            out.write("\n")
        out.write(
            json.dumps(
                {
                    "messages": [
                        {"role": "system", "content": "Answer briefly."},
                        {"role": "user", "content": "What is a daemon?"},
                        {"role": "assistant", "content": "A background process."},
                        {"role": "user", "content": "And a socket?"},
                        {"role": "assistant", "content": "An endpoint."},
                    ]
                }
            )
            + "\n"
        )
    return path


SMALL_STEPS = {"micro_batch_size": 2, "global_batch_size": 4, "log_every": 1, "eval_batches": 2}


def finetune_dict(base, examples, run_dir, method: str = "lora", **train) -> dict:
    return {
        "name": "ft",
        "finetune": {"base": str(base), "examples": str(examples), "method": method},
        "train": {"steps": 6, **SMALL_STEPS, **train},
        "optim": {"lr": 1e-2},
        "schedule": {"warmup_steps": 1},
        "checkpoint": {"dir": str(run_dir), "every": 3, "keep_last": 5},
    }


def finetune(base, examples, run_dir, method: str = "lora", resume=None, **train):
    recipe = finetune_recipe(recipe_from_dict(finetune_dict(base, examples, run_dir, method, **train)))
    trainer = FinetuneTrainer(recipe, CPU)
    return trainer, trainer.fit(resume=resume)


@pytest.fixture(scope="module")
def lora_run(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    examples = write_examples(root / "examples.jsonl")
    base_weights = {name: t.clone() for name, t in open_base(tiny_checkpoint).state_dict().items()}
    trainer, result = finetune(tiny_checkpoint, examples, root / "run")
    return {
        "root": root,
        "examples": examples,
        "trainer": trainer,
        "result": result,
        "base_weights": base_weights,
    }


def open_base(path):
    from llmctl.checkpoint import open_model

    return open_model(path)


def test_a_finetunes_dry_run_plans_what_the_trainer_runs(tiny_checkpoint, tmp_path, llmctl_in_process):
    """The plan's windows (sized from the examples, not the base's context), trainable parameters (LoRA: the
    adapter alone, which alone has gradients and optimizer state) and FLOPs per token are the trainer's own;
    under QLoRA the base weighs its quantized files."""
    examples = write_examples(tmp_path / "examples.jsonl", 24)
    plans = {}
    for method in ("lora", "full"):
        recipe = finetune_recipe(
            recipe_from_dict(finetune_dict(tiny_checkpoint, examples, tmp_path / method, method))
        )
        plan, trainer = finetune_plan(recipe), FinetuneTrainer(recipe, CPU)
        trainable = sum(param.numel() for param in trainer.model.parameters() if param.requires_grad)
        assert (plan.seq_len, plan.trainable) == (trainer.seq_len, trainable) and plan.seq_len < 256
        assert plan.flops_per_token == trainer.flops_per_token
        assert plan.memory["gradients"] == 4 * trainable and plan.memory["optimizer"] == 8 * trainable
        plans[method] = plan
    assert plans["lora"].trainable < plans["full"].trainable == plans["full"].parameters
    qlora = make_plan(recipe, adapter=1000, base_bytes=10**6)
    assert qlora.memory["weights"] == 10**6 + 4000 and qlora.memory["gradients"] == 4000

    (tmp_path / "lora.toml").write_text(
        f'[finetune]\nbase = "{tiny_checkpoint}"\nexamples = "{examples}"\n'
        f'[checkpoint]\ndir = "{tmp_path / "dry"}"\n'
    )
    shown = llmctl_in_process("finetune", str(tmp_path / "lora.toml"), "--dry-run", check=True).stdout
    assert "trainable (adapter)" in shown and not (tmp_path / "dry").exists()


def test_an_adapter_opens_with_peft_on_transformers_and_gives_llmctls_logits(lora_run, tiny_checkpoint):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from llmctl.adapters import open_adapted

    adapter = lora_run["result"].checkpoint
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in adapter.iterdir()}
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        tiny_checkpoint.resolve()
    )
    ids = torch.tensor([[1, 17, 300, 42, 9, 511, 73, 2]])
    unmerged, _ = open_adapted(adapter, merge=False)
    merged, _ = open_adapted(adapter, merge=True)
    base = open_base(tiny_checkpoint)
    with torch.no_grad():
        ours, ours_merged, plain = unmerged(ids), merged(ids), base(ids)
        reference = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny_checkpoint), adapter)(
            ids
        ).logits
    assert (ours - plain).abs().max() > 1e-3  # the adapter changes the model...
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=0)  # ...exactly as PEFT applies it
    torch.testing.assert_close(ours_merged, ours, atol=1e-4, rtol=0)


def test_an_adapter_is_refused_on_other_weights_at_its_base_path(
    tiny_checkpoint, tmp_path, llmctl_in_process
):
    """The adapter records its base's weights digest; another model put at the base's path is refused by
    chat and merge in one line naming both digests, unless --force."""
    import shutil

    from llmctl.checkpoint import open_model, save_checkpoint
    from llmctl.digests import weights_sha256
    from llmctl.model import Transformer
    from llmctl.model.hf_format import export_state_dict

    base = tmp_path / "base"
    shutil.copytree(tiny_checkpoint, base)
    trained_on = weights_sha256(base)
    _, result = finetune(base, write_examples(tmp_path / "examples.jsonl", 8), tmp_path / "run", steps=2)
    adapter = result.checkpoint
    assert json.loads((adapter / "adapter_base.json").read_text()) == {"weights_sha256": trained_on}
    run_llmctl("chat", str(adapter), "--plain", "--max-tokens", "2", check=True)

    config, tokenizer = open_model(base).config, open_tokenizer(tiny_checkpoint)
    shutil.rmtree(base)
    torch.manual_seed(7)
    save_checkpoint(base, config, export_state_dict(Transformer(config)), tokenizer=tokenizer)
    other = weights_sha256(base)
    merged = tmp_path / "merged"
    for command in (
        ["chat", str(adapter), "--plain"],
        ["finetune", "merge", str(adapter), "--out", str(merged)],
    ):
        line = one_error_line(llmctl_in_process(*command))
        assert f"trained on base weights sha256 {trained_on[:12]}" in line and other[:12] in line, line
        assert "--force" in line
    assert not merged.exists()
    llmctl_in_process("finetune", "merge", str(adapter), "--out", str(merged), "--force", check=True)
    assert (merged / "model.safetensors").is_file()


def test_lora_mfu_counts_no_weight_gradients_for_the_frozen_base(tiny_checkpoint, tmp_path):
    """A LoRA step computes input gradients through the base but no weight gradients: 4N FLOPs per token
    against full finetuning's 6N, plus the adapter's 6 per weight."""
    examples = write_examples(tmp_path / "examples.jsonl", 8)
    lora = FinetuneTrainer(
        finetune_recipe(recipe_from_dict(finetune_dict(tiny_checkpoint, examples, tmp_path / "l"))), CPU
    )
    full = FinetuneTrainer(
        finetune_recipe(recipe_from_dict(finetune_dict(tiny_checkpoint, examples, tmp_path / "f", "full"))),
        CPU,
    )
    config, seq = full.model.config, full.seq_len
    attention = 12 * config.n_layer * config.d_model * seq
    adapter = sum(p.numel() for p in lora.model.parameters() if p.requires_grad)
    assert full.flops_per_token == 6 * config.matmul_parameters() + attention
    assert lora.flops_per_token == 4 * config.matmul_parameters() + attention + 6 * adapter


def test_lora_leaves_the_base_bit_identical_and_the_optimizer_holds_only_adapter_state(
    lora_run, tiny_checkpoint
):
    trainer = lora_run["trainer"]
    for name, weight in open_base(tiny_checkpoint).state_dict().items():
        assert torch.equal(weight, lora_run["base_weights"][name]), name
    frozen = {
        n.replace(".base_layer", ""): p for n, p in trainer.model.named_parameters() if "lora_" not in n
    }
    for name, param in frozen.items():  # the in-memory base after training, too
        assert not param.requires_grad and torch.equal(param, lora_run["base_weights"][name]), name
    owned = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    named = {id(p): n for n, p in trainer.model.named_parameters()}
    assert owned and all("lora_" in named[i] for i in owned)
    assert all("lora_" in named[id(p)] for p in trainer.optimizer.state)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    started = next(
        json.loads(line) for line in (lora_run["root"] / "run" / "metrics.jsonl").open() if "started" in line
    )
    assert started["trainable_parameters"] == trainable < started["parameters"] / 5


def test_a_lora_run_resumes_exactly(lora_run, tiny_checkpoint, tmp_path):
    from safetensors.torch import load_file

    halfway = lora_run["root"] / "run" / "checkpoints" / "step-00000003"
    _, resumed = finetune(tiny_checkpoint, lora_run["examples"], tmp_path / "run", resume=str(halfway))
    assert resumed.final_step == 6
    straight = load_file(lora_run["result"].checkpoint / "adapter_model.safetensors")
    again = load_file(resumed.checkpoint / "adapter_model.safetensors")
    assert straight.keys() == again.keys()
    for key in straight:
        assert torch.equal(straight[key], again[key]), key


def test_the_loss_covers_exactly_the_assistant_replies(sample_pipeline):
    tokenizer = open_tokenizer(sample_pipeline["tokenizer"])
    messages = [
        Message("system", "Answer briefly."),
        Message("user", "What is a daemon?"),
        Message("assistant", "A background process, naïve ✓."),
        Message("user", "And a socket?"),
        Message("assistant", "An endpoint:\n    host and port.\n"),
    ]
    example = tokenize_example(messages, tokenizer, MarkerFormat(tokenizer))
    trained = example.ids[example.loss].tolist()
    assert (
        tokenizer.decode(trained)
        == "A background process, naïve ✓.<|end|>An endpoint:\n    host and port.\n<|end|>"
    )
    assert trained.count(tokenizer.piece_id(END)) == 2
    assert example.ids[0] == tokenizer.bos_id and example.ids[-1] == tokenizer.eos_id
    assert not example.loss[
        : 1 + len(tokenizer.encode("<|system|>\nAnswer briefly.<|end|>\n<|user|>\n"))
    ].any()


def test_packing_never_lets_one_example_attend_to_another(sample_pipeline, tiny_checkpoint):
    tokenizer = open_tokenizer(sample_pipeline["tokenizer"])
    chat = MarkerFormat(tokenizer)
    first = tokenize_example([Message("user", "alpha beta"), Message("assistant", "gamma")], tokenizer, chat)
    second = tokenize_example(
        [Message("user", "delta"), Message("assistant", "epsilon zeta")], tokenizer, chat
    )
    packed = pack_examples([first, second], 64, tokenizer.pad_id, packing=True, overlong="skip")
    assert len(packed) == 1
    inputs, targets, segments = window_batch(packed, np.array([0]))
    assert (targets != IGNORE).sum() == first.loss.sum() + second.loss.sum()
    changed = inputs.clone()
    changed[0, 1 : len(first.ids) - 1] = 100  # another first example, same length
    model = open_base(tiny_checkpoint)
    later = slice(len(first.ids), len(first.ids) + len(second.ids) - 1)  # the second example's positions
    with torch.no_grad():
        masked = [model(x, document_ids=segments)[0, later] for x in (inputs, changed)]
        unmasked = [model(x)[0, later] for x in (inputs, changed)]
    torch.testing.assert_close(masked[0], masked[1], atol=1e-6, rtol=0)
    assert (unmasked[0] - unmasked[1]).abs().max() > 1e-4  # without the mask the perturbation would leak


def test_overlong_examples_are_skipped_or_truncated_and_counted(sample_pipeline):
    tokenizer = open_tokenizer(sample_pipeline["tokenizer"])
    chat = MarkerFormat(tokenizer)
    short = tokenize_example([Message("user", "hi"), Message("assistant", "hello")], tokenizer, chat)
    long = tokenize_example([Message("user", "hi"), Message("assistant", "word " * 80)], tokenizer, chat)
    skipped = pack_examples([short, long], 32, tokenizer.pad_id, packing=False, overlong="skip")
    assert (skipped.examples, skipped.skipped, skipped.truncated, len(skipped)) == (1, 1, 0, 1)
    cut = pack_examples([short, long], 32, tokenizer.pad_id, packing=False, overlong="truncate")
    assert (cut.examples, cut.skipped, cut.truncated, len(cut)) == (2, 0, 1, 2)
    assert cut.ids.shape == (2, 33)
    with pytest.raises(UserError, match="longer than the context"):
        pack_examples([long], 32, tokenizer.pad_id, packing=True, overlong="skip")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "2: not valid JSON"),
        ('{"messages": [{"role": "robot", "content": "x"}]}', "2: messages\\[0\\] has unknown role 'robot'"),
        ('{"messages": [{"role": "user", "content": "only a question"}]}', "2: no assistant reply"),
        ('{"prompt": "p"}', "2: prompt and completion must both be strings"),
        ('{"text": "plain"}', "2: expected a messages list or prompt and completion"),
        ('{"prompt": "p <|end|>", "completion": "c"}', "2: messages\\[0\\] contains a chat marker"),
    ],
)
def test_a_malformed_example_is_one_error_naming_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "fine", "completion": "ok"}\n' + line + "\n")
    with pytest.raises(UserError, match=f"bad.jsonl:{message}"):
        read_examples(path)


def test_full_finetuning_with_layer_wise_lr_decay(tiny_checkpoint, tmp_path):
    examples = write_examples(tmp_path / "examples.jsonl", 16)
    raw = finetune_dict(tiny_checkpoint, examples, tmp_path / "run", method="full", steps=2)
    raw["finetune"]["layer_lr_decay"] = 0.5
    del raw["optim"]["lr"]
    recipe = finetune_recipe(recipe_from_dict(raw))
    assert recipe.optim.lr == pytest.approx(2e-4 * 2048 / 64 / 10)  # a tenth of the pretraining default
    trainer = FinetuneTrainer(recipe, CPU)
    # pretraining's Muon and embedding rate are not finetuning's defaults
    assert [type(part) for part in trainer.optimizer.parts] == [torch.optim.AdamW]
    scales = {}
    for group in trainer.optimizer.param_groups:
        for param in group["params"]:
            scales[next(n for n, p in trainer.model.named_parameters() if p is param)] = group["lr_scale"]
    assert scales["model.layers.1.self_attn.q_proj.weight"] == 0.5
    assert scales["model.layers.0.self_attn.q_proj.weight"] == 0.25
    assert scales["model.embed_tokens.weight"] == 0.125 and scales["lm_head.weight"] == 1.0
    result = trainer.fit()
    assert (result.checkpoint / "model.safetensors").is_file() and result.val_loss is not None


def test_finetune_refuses_a_model_shape_that_is_not_the_bases(tiny_checkpoint, tmp_path):
    raw = finetune_dict(tiny_checkpoint, write_examples(tmp_path / "e.jsonl", 4), tmp_path / "run")
    raw["model"] = {"d_model": 128}
    with pytest.raises(UserError, match="takes its model shape from finetune.base"):
        finetune_recipe(recipe_from_dict(raw))
    raw = finetune_dict(tmp_path / "nowhere", tmp_path / "e.jsonl", tmp_path / "run")
    with pytest.raises(UserError, match="finetune.base .*nowhere: it does not exist"):
        finetune_recipe(recipe_from_dict(raw))


# -- a Hugging Face Llama directory with tokenizer.json as the base ------------------------------------------


def test_the_tokenizer_json_backend_round_trips_and_finds_its_special_tokens(tmp_path):
    texts = [json.loads(line)["text"] for line in (REPO / "data" / "sample" / "train.jsonl").open()][:200]
    base = hf_llama_directory(tmp_path / "hf", texts)
    tokenizer = open_tokenizer(base)
    assert type(tokenizer).__name__ == "HFTokenizer"
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (1, 2, 3)
    text = "def f(x):\n\treturn x  # naïve ✓ 日本\n"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.encode("<|user|>") == [tokenizer.piece_id("<|user|>")]
    ids, starts = tokenizer.encode_with_offsets("ab <|end|>")
    assert starts[-1] == 3 and ids[-1] == tokenizer.piece_id("<|end|>")
    (tmp_path / "broken.json").write_text("{}")
    with pytest.raises(UserError, match="is not a Hugging Face tokenizer.json"):
        open_tokenizer(tmp_path / "broken.json")


def test_finetuning_a_hugging_face_llama_directory_then_chatting_with_the_adapter(
    tmp_path, llmctl_in_process
):
    texts = [json.loads(line)["text"] for line in (REPO / "data" / "sample" / "train.jsonl").open()][:200]
    base = hf_llama_directory(tmp_path / "hf", texts)
    examples = write_examples(tmp_path / "examples.jsonl", 24)
    recipe = tmp_path / "lora.toml"
    recipe.write_text(
        f'name = "hf-lora"\n[finetune]\nbase = "{base}"\nexamples = "{examples}"\n'
        f"[train]\nsteps = 4\nmicro_batch_size = 2\nglobal_batch_size = 2\nlog_every = 2\neval_batches = 1\n"
        f'[checkpoint]\ndir = "{tmp_path / "run"}"\n'
    )
    trained = llmctl_in_process("finetune", str(recipe), check=True)
    assert "trainable" in trained.stdout and "examples: 24 used" in trained.stdout
    adapter = tmp_path / "run" / "checkpoints" / "step-00000004"
    chat = subprocess.run(
        [
            sys.executable,
            "-m",
            "llmctl",
            "chat",
            str(base),
            "--adapter",
            str(adapter),
            "--plain",
            "--max-tokens",
            "6",
            "--temperature",
            "0",  # a sampled first token may be the end of the reply
        ],
        input="Which port does service 3 use?\n",
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.strip()  # a reply, decoded by the tokenizer.json backend

    merged = tmp_path / "merged"
    llmctl_in_process("finetune", "merge", str(adapter), "--out", str(merged), check=True)
    assert (merged / "tokenizer.json").is_file() and (merged / "model.safetensors").is_file()
    again = llmctl_in_process("finetune", "merge", str(adapter), "--out", str(merged))
    assert again.returncode == 2 and "--overwrite" in again.stderr


# -- several adapters served on one base ---------------------------------------------------------------------


def test_two_adapters_served_on_one_base_answer_with_their_own_weights(tiny_checkpoint, tmp_path):
    import threading

    import openai
    from conftest import running_server

    from llmctl.adapters import open_adapted
    from llmctl.infer.decode import load_for_inference
    from llmctl.infer.generate import generate_ids
    from llmctl.infer.sampling import SamplingParams
    from llmctl.infer.served import load_served_adapters
    from llmctl.infer.server import create_app

    adapters = {
        name: random_adapter(tiny_checkpoint, tmp_path / name, seed) for seed, name in enumerate("ab")
    }
    served = load_served_adapters("base", tiny_checkpoint, adapters, max_batch=4)
    engine = served["base"].engine
    assert served["a"].engine is engine and served["b"].engine is engine
    base_bytes = sum(p.numel() for p in open_base(tiny_checkpoint).parameters())
    held = {p.data_ptr(): p.numel() for p in engine.model.parameters()}  # distinct storages
    assert base_bytes <= sum(held.values()) < 1.2 * base_bytes  # one base, plus two small adapters

    prompt = [1, 40, 41, 42, 43]
    greedy = SamplingParams(max_new_tokens=8, temperature=0.0)
    expected = {"base": list(generate_ids(load_for_inference(tiny_checkpoint)[0], prompt, greedy))}
    for name, path in adapters.items():
        expected[name] = list(generate_ids(open_adapted(path)[0], prompt, greedy))
    assert len({tuple(ids) for ids in expected.values()}) == 3  # the adapters really differ

    results: dict[str, list[int]] = {}
    finished = {name: threading.Event() for name in expected}

    def collect(name):
        tokens = []

        def on_token(token, finish):
            if token is not None:
                tokens.append(token)
            if finish is not None:
                results[name] = tokens
                finished[name].set()

        return on_token

    for name in ("a", "base", "b"):  # submitted together: one running batch mixes all three
        engine.submit(prompt, greedy, collect(name), served[name].adapter)
    assert all(event.wait(timeout=60) for event in finished.values())
    assert results == expected

    app = create_app(served, routes={}, api_key=None, max_concurrency=8)
    with running_server(app) as running:
        client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="none", max_retries=0)
        assert {model.id for model in client.models.list()} == {"base", "a", "b"}
        texts = {
            name: client.completions.create(model=name, prompt="The Python", max_tokens=6, temperature=0)
            .choices[0]
            .text
            for name in ("a", "b")
        }
        assert texts["a"] != texts["b"]


@pytest.mark.slow
def test_lora_under_torchrun_matches_one_process(tiny_checkpoint, tmp_path):
    import tomli_w

    examples = write_examples(tmp_path / "examples.jsonl", 60)
    losses = {}
    for nproc in (1, 2):
        raw = finetune_dict(tiny_checkpoint, examples, tmp_path / f"run{nproc}", steps=3)
        raw["finetune"]["val_fraction"] = 0.2
        raw["distributed"] = {"strategy": "ddp" if nproc > 1 else "none", "backend": "gloo"}
        recipe = tmp_path / f"lora{nproc}.toml"
        recipe.write_text(tomli_w.dumps(raw))
        result = run_llmctl("finetune", str(recipe), "--nproc", str(nproc), check=True)
        assert result.stdout.count("trainable") == 1  # rank 0 reports
        records = [json.loads(line) for line in (tmp_path / f"run{nproc}" / "metrics.jsonl").open()]
        losses[nproc] = [r["loss"] for r in records if r["event"] == "step"]
    assert len(losses[1]) == 3
    assert losses[2] == pytest.approx(losses[1], rel=1e-4)


def test_continued_pretraining_of_a_hugging_face_base_on_token_files_it_encoded(sample_pipeline, tmp_path):
    from llmctl.data.token_files import encode_corpus, read_meta

    texts = [json.loads(line)["text"] for line in (REPO / "data" / "sample" / "train.jsonl").open()][:200]
    base = hf_llama_directory(tmp_path / "hf", texts)
    encode_corpus(sample_pipeline["corpus"], base / "tokenizer.json", tmp_path / "tokens")
    assert read_meta(tmp_path / "tokens")["eos_id"] == 2
    raw = {
        "name": "cpt",
        "finetune": {"base": str(base), "method": "full"},
        "data": {"tokens": str(tmp_path / "tokens")},
        "train": {
            "steps": 3,
            "micro_batch_size": 2,
            "global_batch_size": 2,
            "seq_len": 64,
            "eval_batches": 1,
        },
        "checkpoint": {"dir": str(tmp_path / "run")},
    }
    trainer = FinetuneTrainer(finetune_recipe(recipe_from_dict(raw)), CPU)
    result = trainer.fit()
    assert math.isfinite(result.val_loss)
    assert {"tokenizer.json", "tokenizer_config.json", "model.safetensors"} <= {
        p.name for p in result.checkpoint.iterdir()
    }

    raw["data"]["tokens"] = str(sample_pipeline["tokens"])  # encoded with another tokenizer
    raw["checkpoint"]["dir"] = str(tmp_path / "other")
    with pytest.raises(UserError, match="tokenizer mismatch"):
        FinetuneTrainer(finetune_recipe(recipe_from_dict(raw)), CPU)


def test_corpus_instructions_makes_examples_from_headed_sections(
    sample_pipeline, tmp_path, llmctl_in_process
):
    out = tmp_path / "instructions.jsonl"
    result = llmctl_in_process(
        "corpus", "instructions", str(sample_pipeline["corpus"]), "--out", str(out), "--limit", "50"
    )
    assert result.returncode == 0, result.stderr
    examples = read_examples(out)
    assert len(examples) == 50 and all(m[0].content.startswith("Explain: ") for m in examples)
    again = llmctl_in_process("corpus", "instructions", str(sample_pipeline["corpus"]), "--out", str(out))
    assert again.returncode == 2 and "--overwrite" in again.stderr


def test_qlora_trains_lora_over_an_int4_base_and_merges_into_its_dequantized_weights(
    tiny_checkpoint, tmp_path
):
    from llmctl.adapters import open_adapted
    from llmctl.checkpoint import latest_checkpoint, open_checkpoint, save_checkpoint
    from llmctl.model.hf_format import export_state_dict
    from llmctl.quantization.qlinear import Int4Linear
    from llmctl.quantization.quantize import QuantizationSettings, quantize_model

    model, tokenizer = open_checkpoint(tiny_checkpoint)
    settings = QuantizationSettings("int4", group_size=32)
    quantize_model(model, settings)
    base = save_checkpoint(
        tmp_path / "int4", model.config, export_state_dict(model), tokenizer=tokenizer,
        quantization_config=settings.to_config(),
    )  # fmt: skip
    examples = write_examples(tmp_path / "examples.jsonl")
    with pytest.raises(UserError, match='is quantized: set finetune.method = "qlora"'):
        finetune(base, examples, tmp_path / "lora")
    with pytest.raises(UserError, match="trains LoRA over a quantized base and .* is not one"):
        finetune(tiny_checkpoint, examples, tmp_path / "float", method="qlora")
    sharded = finetune_dict(base, examples, tmp_path / "fsdp", "qlora")
    sharded["distributed"] = {"strategy": "fsdp"}
    with pytest.raises(UserError, match='QLoRA trains with distributed.strategy "ddp" or "none"'):
        FinetuneTrainer(finetune_recipe(recipe_from_dict(sharded)), CPU)

    recipe = finetune_recipe(
        recipe_from_dict(finetune_dict(base, examples, tmp_path / "run", "qlora", steps=12))
    )
    trainer = FinetuneTrainer(recipe, CPU)
    before = trainer.evaluate()
    frozen = trainer.model.model.layers[0].mlp.down_proj.base_layer
    assert isinstance(frozen, Int4Linear)
    packed = frozen.weight_packed.clone()
    result = trainer.fit()
    assert result.val_loss < before - 0.3, (before, result.val_loss)
    assert torch.equal(frozen.weight_packed, packed)  # the quantized base never moves

    adapter = latest_checkpoint(tmp_path / "run")
    merged, _ = open_adapted(adapter)  # dequantized base + the LoRA update, as plain float layers
    assert type(merged.model.layers[0].mlp.down_proj) is torch.nn.Linear
    ids = torch.tensor([[1, 40, 41, 42, 43]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), trainer.model.eval()(ids), atol=1e-4, rtol=1e-4)


def test_the_window_is_the_longest_example_not_the_bases_context(tiny_checkpoint, tmp_path):
    """Without train.seq_len, chats pack into windows as long as the longest needs (rounded up to 64, within
    the context), not the base's whole context (SmolLM2's 8192 positions ran a 4-chat batch out of 24 GiB);
    a recipe's own seq_len stays."""

    def example(length: int) -> Example:
        return Example(np.zeros(length, dtype=np.int64), np.ones(length, dtype=bool))

    assert example_window([example(30), example(65)], 8192) == 64  # 64 inputs predict 65 ids
    assert example_window([example(30), example(66)], 8192) == 128
    assert example_window([example(5000)], 2048) == 2048
    examples = write_examples(tmp_path / "examples.jsonl", 8)
    short = tmp_path / "short.jsonl"
    short.write_text(
        "".join(line for line in examples.read_text().splitlines(keepends=True) if "prompt" in line)
    )
    fitted = FinetuneTrainer(
        finetune_recipe(recipe_from_dict(finetune_dict(tiny_checkpoint, short, tmp_path / "a"))), CPU
    )
    assert fitted.seq_len == 64 < fitted.model.config.max_seq_len
    chosen = FinetuneTrainer(
        finetune_recipe(recipe_from_dict(finetune_dict(tiny_checkpoint, short, tmp_path / "b", seq_len=96))),
        CPU,
    )
    assert chosen.seq_len == 96
