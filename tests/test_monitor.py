"""The training monitor: the run log that follows metrics.jsonl, the Textual app driven by its pilot, and
`llmctl train --tui` stopping its trainer."""

from __future__ import annotations

import html
import json
import os
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import tomli_w
from conftest import Terminal, tiny_recipe_dict, wait_until

from llmctl.train.run_log import RunLog, Series

pytest.importorskip("textual_plotext")


def started(run_dir: Path, total: int = 240, **extra) -> dict:
    return {
        "event": "started",
        "step": 0,
        "name": "tiny",
        "parameters": 2_400_000,
        "world_size": 1,
        "device": "cpu",
        "strategy": "none",
        "precision": "fp32",
        "steps": total,
        "global_batch_size": 8,
        "seq_len": 256,
        "run_dir": str(run_dir),
        **extra,
    }


def step_record(step: int, loss: float | None = None) -> dict:
    return {
        "event": "step",
        "step": step,
        "loss": 8 - step / 40 if loss is None else loss,
        "lr": 3e-3,
        "grad_norm": 0.8,
        "tokens_per_second": 2048.0,
        "memory_bytes": 1.5 * 2**30,
        "elapsed_seconds": float(step),
        "mfu": 0.25,
    }


def fixed_run(run_dir: Path, last: int = 120, total: int = 240, name: str = "tiny") -> Path:
    """A run at step `last` of `total`: steps every 10, eval and checkpoint every 40, one sample."""
    run_dir.mkdir(parents=True, exist_ok=True)
    records = [started(run_dir, total, name=name)]
    for step in range(10, last + 1, 10):
        records.append(step_record(step))
        if step % 40 == 0:
            records.append({"event": "eval", "step": step, "val_loss": 8.2 - step / 40, "val_ppl": 100.0})
            records.append(
                {"event": "checkpoint", "step": step, "path": f"{run_dir}/checkpoints/step-{step:08d}"}
            )
    records.append(
        {"event": "sample", "step": last, "prompt": "The Python", "text": "The Python tutorial says"}
    )
    write(run_dir, records, "w")
    return run_dir


def write(run_dir: Path, records: list[dict], mode: str = "a", tail: str = "") -> None:
    with (run_dir / "metrics.jsonl").open(mode) as handle:
        handle.write("".join(json.dumps(record) + "\n" for record in records) + tail)


def svg_lines(svg: str) -> list[str]:
    """The text of an SVG screenshot, row by row."""
    rows = defaultdict(list)
    for x, y, text in re.findall(r'<text[^>]*?x="([\d.]+)"[^>]*?y="([\d.]+)"[^>]*>(.*?)</text>', svg):
        rows[float(y)].append((float(x), html.unescape(text).replace("\xa0", " ")))
    return ["".join(text for _, text in sorted(parts)) for _, parts in sorted(rows.items())]


# -- the run log -------------------------------------------------------------------------------------------


def test_run_log_takes_whole_lines_only_and_follows_resume_and_overwrite(tmp_path):
    run = fixed_run(tmp_path / "run", last=40)
    log = RunLog(run)
    assert log.poll() and log.step == 40 and log.curves["loss"].steps == [10, 20, 30, 40]
    assert log.status() == "running" and log.best_val_loss == pytest.approx(7.2)
    assert not log.poll()  # nothing new

    half = json.dumps(step_record(50))
    write(run, [], tail=half[:25])  # the trainer is mid-line
    assert not log.poll() and log.step == 40
    write(run, [], tail=half[25:] + "\n")
    assert log.poll() and log.step == 50

    write(run, [], tail="{not json\n")  # a crash's leftover is skipped
    write(run, [started(run), {"event": "resumed", "step": 20, "checkpoint": "c"}, step_record(30, loss=1.0)])
    log.poll()
    assert log.curves["loss"].steps == [10, 20, 30] and log.curves["loss"].values[-1] == 1.0

    write(run, [{"event": "finished", "step": 240, "checkpoint": "c", "val_loss": 1.0}])
    log.poll()
    assert log.status() == "finished"

    fixed_run(run, last=10)  # --overwrite: a shorter file in its place
    assert log.poll() and log.curves["loss"].steps == [10] and log.status() == "running"


def test_curves_keep_their_shape_in_bounded_memory():
    series = Series(capacity=1000)
    for step in range(1, 1_000_001):
        series.add(step, 1.0 / step)
    assert len(series) <= 1000 and series.steps[0] == 1 and series.steps[-1] > 990_000
    assert series.steps == sorted(series.steps)


def test_a_long_run_is_read_in_bounded_pieces_and_memory(tmp_path, monkeypatch):
    import llmctl.train.run_log as run_log

    run = tmp_path / "run"
    run.mkdir()
    write(run, [started(run, total=50_000), *(step_record(s) for s in range(1, 50_001))])
    monkeypatch.setattr(run_log, "POLL_BYTES", 1 << 20)
    log = RunLog(run, capacity=500)
    log.poll()
    assert 0 < log.step < 50_000  # one poll reads one piece: a view is never frozen by a huge file
    log.read_all()
    assert log.step == 50_000 and max(len(series) for series in log.curves.values()) <= 500


# -- the app -----------------------------------------------------------------------------------------------


def summary_text(app) -> str:
    return str(app.query_one("#summary").render())


async def test_monitor_shows_the_last_line_and_follows_what_is_appended(tmp_path):
    from llmctl.tui.monitor import MonitorApp

    run = fixed_run(tmp_path / "run")
    app = MonitorApp([run], poll_seconds=60)  # the test polls by hand
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause()
        text = summary_text(app)
        assert "step 120/240" in text and "50%" in text and "train loss 5.0000" in text
        assert "tokens/s 2,048" in text and "MFU 25.0%" in text and "ETA 2:00" in text
        assert "'The Python' -> 'The Python tutorial says'" in str(app.query_one("#samples").render())
        assert "checkpoint saved: step-00000120" in str(app.query_one("#events").render())

        write(run, [step_record(130, loss=4.5)], tail='{"event": "step", "step": 14')  # and a torn line
        app.poll()
        await pilot.pause()
        assert "step 130/240" in summary_text(app) and "train loss 4.5000" in summary_text(app)
        assert app.logs[run].curves["loss"].steps[-1] == 130


async def test_the_childs_last_line_heads_the_screen_before_any_run_exists(tmp_path):
    """`llmctl up --tui`: the stages before training write no run directory, so the monitor shows the child's
    latest console line (read from the tail of its output file) until, and while, its training runs."""
    from llmctl.tui.monitor import MonitorApp

    output = tmp_path / "output.txt"
    output.write_text("llmctl up docs -> runs/acme\ncorpus done in 1.3s: 18 training documents\n\n")
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        app = MonitorApp([tmp_path / "runs"], poll_seconds=60, training=child, training_output=output)
        async with app.run_test(size=(120, 40)) as pilot:
            await pilot.pause()
            assert app.sub_title == "corpus done in 1.3s: 18 training documents"
            with output.open("a") as file:
                file.write("x" * 5000 + "\ntokenizer done in 0.1s: 1,024 pieces\r\n└────┴────┘\n")
            app.poll()
            await pilot.pause()
            assert app.sub_title == "tokenizer done in 0.1s: 1,024 pieces"
            assert "tokenizer done in 0.1s" in str(app.query_one("HeaderTitle").render())
    finally:
        child.kill()
        child.wait()


async def test_ranks_of_a_torchrun_run_get_a_row_each(tmp_path):
    from llmctl.tui.monitor import MonitorApp

    run = fixed_run(tmp_path / "run")
    write(run, [started(run, world_size=2), step_record(130)])
    (run / "ranks").mkdir()
    for rank, speed in (
        (0, 1000.0),
        (1, 950.0),
        (2, 10.0),
    ):  # rank 2: a file left by an earlier, wider session
        record = {"event": "rank", "step": 130, "rank": rank, "world_size": 2, "tokens_per_second": speed}
        (run / "ranks" / f"rank-{rank}.jsonl").write_text(json.dumps(record | {"memory_bytes": 2**30}) + "\n")
    app = MonitorApp([run], poll_seconds=60)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause()
        table = app.query_one("#ranks")
        assert table.display and table.row_count == 2
        assert [table.get_row_at(i)[:3] for i in range(2)] == [["0", "130", "1,000"], ["1", "130", "950"]]


async def test_each_footer_key_does_what_it_says(tmp_path):
    from llmctl.tui.monitor import MonitorApp

    first, second = fixed_run(tmp_path / "a", name="first"), fixed_run(tmp_path / "b", name="second", last=80)
    app = MonitorApp([tmp_path], poll_seconds=60)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause()
        assert set(app.logs) == {first, second} and app.selected == first
        plot = app.query_one("#plot")

        await pilot.press("p")  # pause: appended lines wait
        write(first, [step_record(130)])
        app.poll()
        await pilot.pause()
        assert "paused" in summary_text(app) and "step 120/240" in summary_text(app)
        await pilot.press("p")
        app.poll()
        await pilot.pause()
        assert "step 130/240" in summary_text(app)

        linear = str(plot.render())
        await pilot.press("l")
        assert app.log_scale and str(plot.render()) != linear

        await pilot.press("c")  # compare: both runs' curves, one legend entry each
        compared = str(plot.render())
        assert "2 runs compared" in compared and "first" in compared and "second" in compared
        await pilot.press("down", "space")  # mark only the second run
        assert app.selected == second and app.marked == {second}
        assert "1 runs compared" in str(plot.render())

        await pilot.press("q")
        await pilot.pause()
    assert app.return_code == 0 and not app.is_running


async def test_a_snapshot_of_the_monitor_holds_the_run_and_the_keys(tmp_path):
    from llmctl.tui.monitor import MonitorApp

    run = fixed_run(tmp_path / "run")
    app = MonitorApp([run], poll_seconds=60)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause()
        lines = svg_lines(app.export_screenshot())
    screen = "\n".join(lines)
    assert any(line.split()[:3] == ["tiny", "running", "120/240"] for line in lines), screen
    assert "tiny: loss" in screen and "train loss" in screen and "val loss" in screen
    assert "░" in screen and "50%" in screen
    footer = lines[-1]
    for key in ("chat", "q quit", "p pause following", "l log scale", "c compare"):
        assert key in footer, footer


async def test_enter_opens_chat_on_the_runs_newest_checkpoint(sample_pipeline, tmp_path):
    import torch

    from llmctl.recipe import recipe_from_dict
    from llmctl.train.distributed import DistributedContext
    from llmctl.train.trainer import Trainer
    from llmctl.tui.chat import Bubble, ChatScreen
    from llmctl.tui.monitor import MonitorApp

    recipe = tiny_recipe_dict(sample_pipeline, tmp_path / "run", steps=4, sample_every=2)
    recipe["train"]["sample_prompts"] = ["The"]
    recipe["train"]["sample_tokens"] = 4
    Trainer(recipe_from_dict(recipe), DistributedContext(0, 0, 1, torch.device("cpu"))).fit()
    log = RunLog(tmp_path / "run").read_all()
    assert log.status() == "finished" and [s["step"] for s in log.samples] == [4]
    assert {e["event"] for e in log.events} >= {"started", "checkpoint", "finished"}
    samples = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in samples if r["event"] == "sample"] == [2, 4]  # mid-run and at the end

    app = MonitorApp([tmp_path / "run"], poll_seconds=60)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.pause()
        await pilot.press("enter")
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert isinstance(app.screen, ChatScreen) and app.screen.checkpoint.endswith("step-00000004")
        await pilot.press(*"quiet please", "enter")  # typing q in the prompt does not quit the monitor
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert app.is_running and len(app.screen.query(Bubble)) == 2
        await pilot.press("escape")
        await pilot.pause()
        assert not isinstance(app.screen, ChatScreen)


def test_train_tui_follows_the_run_and_q_stops_it_with_a_checkpoint(sample_pipeline, tmp_path):
    """`llmctl train RECIPE --tui` on a real (pseudo-)terminal: the monitor comes up over a training child;
    `q` asks the trainer to checkpoint and stop, and the command says how to resume."""
    run = tmp_path / "run"
    (tmp_path / "recipe.toml").write_text(
        tomli_w.dumps(tiny_recipe_dict(sample_pipeline, run, steps=100_000))
    )
    terminal = Terminal(
        [sys.executable, "-m", "llmctl", "train", str(tmp_path / "recipe.toml"), "--tui"], dict(os.environ)
    )
    wait_until(lambda: RunLog(run).read_all().step >= 2, timeout=120, message="training did not start")
    wait_until(lambda: "llmctl monitor" in terminal.text(), timeout=30, message="the monitor did not draw")
    assert terminal.stop_with(b"q") == 130
    assert f"stopped; continue with: llmctl train {tmp_path / 'recipe.toml'} --resume auto" in terminal.text()
    log = RunLog(run).read_all()
    assert log.status() == "interrupted" and log.last_checkpoint is not None


def test_monitor_and_report_refuse_bad_paths_in_one_line(llmctl, tmp_path):
    result = llmctl("monitor", str(tmp_path / "missing"))
    assert result.returncode == 2 and "is not a directory" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    result = llmctl("monitor", cwd=tmp_path)  # no runs/ here
    assert result.returncode == 2 and "llmctl train RECIPE --tui" in result.stderr
