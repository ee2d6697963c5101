"""`llmctl report`: PNG plots that open as images and one HTML page that embeds them with the run's numbers."""

from __future__ import annotations

import base64
import json
import re

import pytest
import tomli_w
from conftest import tiny_recipe_dict

pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def two_runs(sample_pipeline, tmp_path_factory):
    """Two short real runs (different lr) and an eval file of the first one's checkpoint."""
    from conftest import run_llmctl

    root = tmp_path_factory.mktemp("report")
    runs = []
    for name, lr in (("base", 3e-3), ("hot", 1e-2)):
        recipe = tiny_recipe_dict(sample_pipeline, root / name, steps=6, eval_every=3)
        recipe["name"], recipe["optim"]["lr"] = name, lr
        recipe["train"] |= {"sample_prompts": ["The"], "sample_tokens": 6}
        (root / f"{name}.toml").write_text(tomli_w.dumps(recipe))
        run_llmctl("train", str(root / f"{name}.toml"), check=True)
        runs.append(root / name)
    checkpoint = runs[0] / "checkpoints" / "step-00000006"
    run_llmctl(
        "eval",
        str(checkpoint),
        "--data",
        str(sample_pipeline["corpus"]),
        "--out",
        str(root / "eval.json"),
        check=True,
    )
    return runs, root / "eval.json"


def test_report_writes_images_and_a_page_that_holds_them(two_runs, tmp_path, llmctl_in_process):
    from PIL import Image

    (base, hot), eval_file = two_runs
    result = llmctl_in_process(
        "report", str(base), str(hot), "--eval", str(eval_file), "--out", str(tmp_path / "out")
    )
    assert result.returncode == 0, result.stderr
    page = tmp_path / "out" / "report.html"
    assert result.stdout.strip() == f"report: {page}"
    pngs = sorted((tmp_path / "out").glob("*.png"))
    assert {p.stem for p in pngs} >= {"loss", "lr", "grad_norm", "tokens_per_second", "memory_bytes"}
    text = page.read_text()
    for png in pngs:
        with Image.open(png) as image:
            image.verify()
            assert image.format == "PNG" and image.size[0] > 400
        assert base64.b64encode(png.read_bytes()).decode() in text  # embedded: the page stands alone
    assert not re.search(r"src=['\"](?!data:)", text)
    # both runs' final numbers, the eval results of the first, the samples and the recipes
    losses = [json.loads(line) for line in (base / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in losses if r["event"] == "eval"][-1]["val_loss"]
    assert f"{final:.4f}" in text and "<th>base</th><th>hot</th>" in text
    results = json.loads(eval_file.read_text())["results"]
    ((task, metrics),) = results.items()
    assert f"<td>{task}</td>" in text and f"{metrics['bits_per_byte']:.4g}" in text
    assert "Samples at step 6" in text and "lr = 0.01" in text


def test_report_refuses_bad_input_without_writing(two_runs, tmp_path, llmctl_in_process):
    (base, _), eval_file = two_runs
    result = llmctl_in_process("report", str(tmp_path), "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and "no metrics.jsonl" in result.stderr and not (tmp_path / "out").exists()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    result = llmctl_in_process("report", str(base), "--out", str(tmp_path / "taken"))
    assert result.returncode == 2 and "--overwrite" in result.stderr
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"
    result = llmctl_in_process("report", str(base), "--out", str(base.parent), "--overwrite")
    assert result.returncode == 2 and "would replace the run" in result.stderr
    assert (base / "metrics.jsonl").is_file()
    (tmp_path / "bad.json").write_text("{")
    result = llmctl_in_process(
        "report", str(base), "--eval", str(tmp_path / "bad.json"), "--out", str(tmp_path / "x")
    )
    assert result.returncode == 2 and "not a readable JSON file" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "x").exists()
    page = tmp_path / "report.html"
    result = llmctl_in_process("report", str(base), "--out", str(page))
    assert result.returncode == 2 and f"--out {tmp_path / 'report'} writes" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not page.exists()
