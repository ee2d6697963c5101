"""`llmctl eval`: perplexity equals transformers', the lm-eval adapter equals lm-eval's own hf model,
generation metrics equal the libraries', and suites, results and comparisons work from the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from llmctl.data.corpus import iter_texts
from llmctl.evaluate.perplexity import perplexity
from llmctl.evaluate.scoring import sliding_windows
from llmctl.evaluate.suite import build_domain_suite
from llmctl.evaluate.text_metrics import generation_metrics

transformers = pytest.importorskip("transformers")


def test_sliding_windows_score_every_position_once():
    for length, window, stride in [(10, 4, 2), (100, 32, 16), (5, 8, 4), (33, 16, 16), (70, 16, 40)]:
        spans = sliding_windows(length, window, stride)
        scored = [p for _, end, first in spans for p in range(first, end)]
        assert scored == list(range(1, length))
        assert all(end - begin <= window for begin, end, _ in spans)
        assert all(first > begin for begin, _, first in spans)  # every scored token has context


def test_batched_scores_equal_one_sequence_at_a_time(monkeypatch):
    from llmctl.evaluate import scoring
    from llmctl.model import ModelConfig, Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=50, d_model=32, n_layer=2, n_head=4, max_seq_len=64)).eval()
    generator = torch.Generator().manual_seed(1)
    items = []
    for _ in range(23):
        length = int(torch.randint(2, 65, (1,), generator=generator))
        tokens = torch.randint(0, 50, (length,), generator=generator).tolist()
        items.append((tokens, int(torch.randint(1, length, (1,), generator=generator))))
    # multiple-choice style: one context, four one-token answers (one forward row between them)
    items += [([3, 4, 5, 6, answer], 4) for answer in (7, 8, 9, 10)]
    alone = [scoring.batched_continuation_logprobs(model, [item], batch_size=1)[0] for item in items]
    monkeypatch.setattr(scoring, "TOKENS_PER_BATCH", 200)  # long rows split into smaller batches too
    together = scoring.batched_continuation_logprobs(model, items, batch_size=8)
    for (tokens, score_from), (a, greedy_a), (b, greedy_b) in zip(items, alone, together, strict=True):
        assert len(a) == len(tokens) - score_from
        assert torch.allclose(a, b, atol=1e-5) and torch.equal(greedy_a, greedy_b)
    texts = ["a b c d e " * n for n in range(1, 30)]

    class Characters:  # a tokenizer stand-in: one id per character
        bos_id = 1

        def encode(self, text):
            return [2 + ord(c) % 40 for c in text]

    one = perplexity(model, Characters(), texts, window=16, stride=8, batch_size=1)
    many = perplexity(model, Characters(), texts, window=16, stride=8, batch_size=8)
    assert one.tokens == many.tokens and abs(one.nll - many.nll) < 1e-3


def test_perplexity_equals_transformers_on_the_same_windows(tiny_checkpoint, sample_pipeline):
    from llmctl.checkpoint import open_checkpoint

    model, tokenizer = open_checkpoint(tiny_checkpoint)
    texts = list(iter_texts(sample_pipeline["corpus"], "val"))[:3]
    ours = perplexity(model, tokenizer, texts, window=64, stride=32)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    nll, tokens = 0.0, 0
    for text in texts:
        ids = [tokenizer.bos_id, *tokenizer.encode(text)]
        for begin, end, first in sliding_windows(len(ids), 64, 32):
            with torch.no_grad():
                logits = hf(torch.tensor([ids[begin:end]])).logits[0].double()
            log_probs = torch.log_softmax(logits, -1)
            for position in range(first, end):
                nll -= float(log_probs[position - begin - 1, ids[position]])
                tokens += 1
    assert ours.tokens == tokens
    assert abs(ours.token_perplexity - math.exp(nll / tokens)) <= 1e-3 * math.exp(nll / tokens)
    assert ours.ci95[0] <= ours.token_perplexity <= ours.ci95[1]
    assert ours.bits_per_byte == pytest.approx(nll / math.log(2) / ours.bytes, rel=1e-3)


def test_generation_metrics_equal_the_libraries():
    import sacrebleu
    from rouge_score import rouge_scorer

    predictions = ["The cat sat on the mat.", "Lists are mutable sequences", "open the file"]
    references = ["The cat is on the mat.", "Lists are mutable sequences", "Open a file for reading"]
    ours = generation_metrics(predictions, references)
    assert ours["bleu"] == sacrebleu.corpus_bleu(predictions, [references]).score
    assert ours["chrf"] == sacrebleu.corpus_chrf(predictions, [references]).score
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    for key in ("rouge1", "rouge2", "rougeL"):
        expected = (
            100
            * sum(scorer.score(r, p)[key].fmeasure for p, r in zip(predictions, references, strict=True))
            / 3
        )
        assert ours[key] == pytest.approx(expected)
    assert ours["exact_match"] == pytest.approx(100 / 3)


@pytest.fixture(scope="module")
def domain_suite(sample_pipeline, tmp_path_factory):
    return build_domain_suite(sample_pipeline["corpus"], tmp_path_factory.mktemp("suite") / "domain")


def test_lm_eval_adapter_matches_lm_evals_hf_model(tiny_checkpoint, domain_suite):
    import lm_eval
    from lm_eval.tasks import TaskManager

    import llmctl.evaluate.lm_eval_adapter  # noqa: F401  (registers the model type)

    manager = TaskManager(include_path=str(domain_suite.parent), include_defaults=False)
    outputs = {
        name: lm_eval.simple_evaluate(
            model=name,
            model_args=f"pretrained={tiny_checkpoint}" + (",dtype=float32" if name == "hf" else ""),
            tasks=["domain_cloze"],
            task_manager=manager,
            limit=12,
            log_samples=True,
            device="cpu",
        )
        for name in ("llmctl", "hf")
    }
    ours = [[float(r[0]) for r in s["filtered_resps"]] for s in outputs["llmctl"]["samples"]["domain_cloze"]]
    theirs = [[float(r[0]) for r in s["filtered_resps"]] for s in outputs["hf"]["samples"]["domain_cloze"]]
    assert len(ours) == 12 and all(len(row) == 4 for row in ours)
    for mine, reference in zip(ours, theirs, strict=True):
        for a, b in zip(mine, reference, strict=True):
            assert abs(a - b) <= 1e-4, (a, b)


def test_cli_suite_results_and_compare(tiny_checkpoint, domain_suite, tmp_path, llmctl_in_process):
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    result = llmctl_in_process(
        "eval",
        str(tiny_checkpoint),
        "--suite",
        "domain",
        "--data",
        str(domain_suite.parent),
        "--out",
        str(first),
        check=True,
    )
    assert "heldout" in result.stdout and "cloze" in result.stdout and "rougeL" in result.stdout
    record = json.loads(first.read_text())
    assert record["suite"] == "domain" and len(record["checkpoint_sha256"]) == 64 and record["llmctl_version"]
    assert set(record["results"]) == {"heldout", "cloze", "headings"}
    assert 0.0 <= record["results"]["cloze"]["domain_cloze"]["acc"] <= 1.0
    not_text = llmctl_in_process(
        "eval",
        str(tiny_checkpoint),
        "--data",
        str(domain_suite.parent / "headings.jsonl"),
        "--out",
        str(second),
    )
    assert (
        not_text.returncode == 2
        and "headings.jsonl:1: expected a JSON object with a string field 'text'" in not_text.stderr
    )
    assert not second.exists()  # nothing half-written on error
    text_file = tmp_path / "doc.txt"
    text_file.write_text("The Python tutorial explains lists and dictionaries.")
    llmctl_in_process(
        "eval", str(tiny_checkpoint), "--data", str(text_file), "--out", str(second), check=True
    )
    table = llmctl_in_process("eval", "compare", str(first), str(second), check=True).stdout
    assert "difference" in table and "token_perplexity" in table
    assert "paired bootstrap" not in table  # different documents: nothing to pair
    same = llmctl_in_process("eval", "compare", str(first), str(first), check=True).stdout
    documents = len(record["results"]["heldout"]["per_document"]["nll"])
    assert "heldout: bits per byte, second - first = +0.0000" in same
    assert f"paired bootstrap over {documents} documents): no significant difference" in same


def test_paired_bootstrap_finds_a_real_difference_and_not_a_random_one():
    from llmctl.evaluate.perplexity import paired_bootstrap

    rng = np.random.default_rng(0)
    sizes = rng.integers(500, 5000, 300)
    first = sizes * math.log(2) * rng.normal(2.0, 0.3, 300)  # nats, ~2 bits per byte, varying by document
    result = lambda nll: {"per_document": {"nll": nll.tolist(), "bytes": sizes.tolist()}}  # noqa: E731
    better = first - sizes * math.log(2) * rng.normal(0.02, 0.05, 300)  # 0.02 bits per byte better, noisily
    tested = paired_bootstrap(result(first), result(better))
    assert tested.significant and tested.ci95[1] < 0 and tested.difference == pytest.approx(-0.02, abs=0.008)
    jitter = rng.normal(0.0, 0.05, 300)
    jitter -= (jitter * sizes).sum() / sizes.sum()  # no difference overall, only per-document noise
    noise = first + sizes * math.log(2) * jitter
    tested = paired_bootstrap(result(first), result(noise))
    assert not tested.significant and tested.p_value > 0.05
    # unpaired: the spread between documents (0.3 bits) would hide the 0.02; paired, it cancels out
    assert tested.ci95[1] - tested.ci95[0] < 0.03
    other_documents = {"per_document": {"nll": first.tolist(), "bytes": (sizes + 1).tolist()}}
    assert paired_bootstrap(result(first), other_documents) is None


def test_include_path_task_runs_offline_from_the_cli(tiny_checkpoint, domain_suite, llmctl_in_process):
    result = llmctl_in_process(
        "eval",
        str(tiny_checkpoint),
        "--tasks",
        "domain_cloze",
        "--include-path",
        str(domain_suite.parent),
        "--limit",
        "5",
        check=True,
    )
    assert "domain_cloze" in result.stdout and "acc" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["eval", "/nonexistent/ckpt", "--data", "x.txt"], "not a checkpoint"),
        (["eval", "CKPT", "--suite", "BAD_SUITE"], "tasks.0.type"),
        (["eval", "CKPT"], "nothing to evaluate"),
        (["eval", "CKPT", "--tasks", "no_such_task", "--include-path", "SUITE_DIR"], "no_such_task"),
        (["eval", "CKPT", "--data", "TMP/empty.txt"], "no text to evaluate"),
        (["eval", "CKPT", "--data", "TMP/latin1.txt"], "is not UTF-8 text"),
        (["eval", "CKPT", "--data", "TMP/number.jsonl"], "string field 'text'"),
        (["eval", "CKPT", "--data", "TMP/notes.txt", "--window", "100000"], "exceeds the model's context"),
        (["eval", "CKPT", "--data", "TMP/notes.txt", "--out", "TMP"], "is a folder"),
        (["eval", "CKPT", "--data", "TMP/[bold]missing.txt"], "not found: TMP/[bold]missing.txt"),
        (["eval", "compare", "TMP/notes.txt", "TMP/notes.txt"], "is not an `llmctl eval --out` results file"),
        (["eval", "compare", "TMP/no_results.json", "TMP/no_results.json"], "is not an `llmctl eval"),
    ],
)
def test_user_errors_are_one_line(tiny_checkpoint, domain_suite, tmp_path, llmctl_in_process, args, message):
    bad_suite = tmp_path / "bad.toml"
    bad_suite.write_text('name = "x"\n[[tasks]]\nname = "t"\ntype = "quiz"\n')
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9 cr\u00e8me".encode("latin-1"))
    (tmp_path / "number.jsonl").write_text('{"text": 5}\n')
    (tmp_path / "notes.txt").write_text("A short note about modules and files.\n" * 20)
    (tmp_path / "no_results.json").write_text('{"results": 5}')
    args = [
        a.replace("CKPT", str(tiny_checkpoint))
        .replace("BAD_SUITE", str(bad_suite))
        .replace("SUITE_DIR", str(domain_suite.parent))
        .replace("TMP", str(tmp_path))
        for a in args
    ]
    result = llmctl_in_process(*args)
    message = message.replace("TMP", str(tmp_path))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert message in line, line


def test_results_files_are_never_replaced_without_overwrite_or_written_into_an_input(
    tiny_checkpoint, tmp_path, llmctl_in_process
):
    data = tmp_path / "notes.txt"
    data.write_text("A short note about modules and files.\n" * 20)
    kept = tmp_path / "kept.json"
    kept.write_text("a user's file")
    for out, flags, expected in (
        (kept, [], "pass --overwrite"),
        (data, ["--overwrite"], "overlaps the input"),
        (tiny_checkpoint / "eval.json", ["--overwrite"], "overlaps the input"),
    ):
        result = llmctl_in_process(
            "eval", str(tiny_checkpoint), "--data", str(data), "--out", str(out), *flags
        )
        assert result.returncode == 2 and expected in result.stderr, result.stderr
    assert kept.read_text() == "a user's file" and not (tiny_checkpoint / "eval.json").exists()
    llmctl_in_process(
        "eval", str(tiny_checkpoint), "--data", str(data), "--out", str(kept), "--overwrite", check=True
    )
    assert json.loads(kept.read_text())["results"]["perplexity"]["tokens"] > 0


def test_a_suite_leaves_out_the_tasks_its_corpus_gives_no_items_for(llmctl_in_process, tmp_path):
    """Prose without short heading lines (licences, say) gives cloze items but no heading items: the suite has
    no headings task rather than one whose empty data fails every evaluation of it."""
    from conftest import sample_texts

    from llmctl.evaluate.suite import load_suite

    docs = tmp_path / "docs"
    docs.mkdir()
    for index, text in enumerate(sample_texts(40)):
        (docs / f"doc{index}.txt").write_text(" ".join(text.split()))  # each document one paragraph
    build = llmctl_in_process(
        "corpus", "build", str(docs), "--out", str(tmp_path / "corpus"), "--val-fraction", "0.5"
    )
    assert build.returncode == 0, build.stderr
    suite = load_suite(build_domain_suite(tmp_path / "corpus", tmp_path / "suite"))
    assert [task.name for task in suite.tasks] == ["heldout", "cloze"]
    assert not (tmp_path / "suite" / "headings.jsonl").exists()
