"""`llmctl report`: one or more runs as PNG plots (matplotlib) and one self-contained HTML page that embeds
them beside each run's recipe, final metrics, samples, events and any eval results, for people who never
open a terminal."""

from __future__ import annotations

import base64
import html
import json
import time
from dataclasses import dataclass
from pathlib import Path

from llmctl.atomic import atomic_directory, check_output
from llmctl.errors import UserError
from llmctl.evaluate.results import flatten
from llmctl.train.run_log import METRICS_FILE, RunLog, summary

PLOTS = {  # file stem: (title, y label, [(curve, legend suffix)], log scale)
    "loss": ("Loss", "cross-entropy (nats/token)", [("loss", "train"), ("val_loss", "val")], False),
    "lr": ("Learning rate", "lr", [("lr", "")], False),
    "grad_norm": ("Gradient norm (before clipping)", "L2 norm", [("grad_norm", "")], True),
    "tokens_per_second": ("Throughput", "tokens/s", [("tokens_per_second", "")], False),
    "mfu": ("Model FLOPs utilisation", "MFU (fraction of peak)", [("mfu", "")], False),
    "memory_bytes": ("Memory", "GiB", [("memory_bytes", "")], False),
}
REPORT_PAGE = "report.html"


@dataclass
class RunReport:
    log: RunLog
    recipe: str | None
    evals: list[tuple[Path, dict]]


def load_run(run_dir: Path, eval_files: list[Path]) -> RunReport:
    if not (run_dir / METRICS_FILE).is_file():
        raise UserError(f"{run_dir} has no {METRICS_FILE}: not a run directory (checkpoint.dir of a recipe)")
    log = RunLog(run_dir, capacity=5000).read_all()
    recipe = run_dir / "recipe.toml"
    evals = [(path, read_eval(path)) for path in eval_files]
    return RunReport(log, recipe.read_text(encoding="utf-8") if recipe.is_file() else None, evals)


def read_eval(path: Path) -> dict:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise UserError(f"--eval {path}: not a readable JSON file ({error})") from None
    if not isinstance(record, dict) or not isinstance(record.get("results"), dict):
        raise UserError(f"--eval {path}: not an `llmctl eval --out` file (no results)")
    return record


def eval_files_for(run_dir: Path, given: list[Path], only_run: bool) -> list[Path]:
    """The eval*.json files kept in the run directory, and the --eval files that belong to it: all of them
    when it is the only run, else those whose checkpoint lies inside it."""
    own = sorted(run_dir.glob("eval*.json"))
    resolved = run_dir.resolve()
    for path in given:
        checkpoint = Path(read_eval(path).get("checkpoint") or "").resolve()
        if only_run or resolved == checkpoint or resolved in checkpoint.parents:
            own.append(path)
    return list(dict.fromkeys(own))


def write_report(run_dirs: list[Path], out: Path, eval_files: list[Path], overwrite: bool = False) -> Path:
    """Write the plots and the page into `out` (replaced whole, or left as it was on failure). `out` may lie
    inside a run directory, never over one."""
    if out.suffix.lower() in (".html", ".htm"):
        raise UserError(
            f"--out {out} names a page, but it is the folder for the page and its plots: "
            f"--out {out.with_suffix('')} writes {out.with_suffix('') / REPORT_PAGE}"
        )
    only_run = len(run_dirs) == 1
    reports = [load_run(run_dir, eval_files_for(run_dir, eval_files, only_run)) for run_dir in run_dirs]
    claimed = {path for report in reports for path, _ in report.evals}
    unclaimed = [path for path in eval_files if path not in claimed]
    if unclaimed:
        raise UserError(
            f"--eval {unclaimed[0]} evaluates a checkpoint outside these runs; report its run with it"
        )
    target = out.resolve()
    for run_dir in run_dirs:
        if target == run_dir.resolve() or target in run_dir.resolve().parents:
            raise UserError(f"--out {out} would replace the run {run_dir}; write the report elsewhere")
    check_output(out, [], overwrite)
    with atomic_directory(out) as staging:
        images = {stem: draw_plot(reports, stem, staging / f"{stem}.png") for stem in PLOTS}
        page = render_page(reports, {stem: path for stem, path in images.items() if path is not None})
        (staging / REPORT_PAGE).write_text(page, encoding="utf-8")
    return out / REPORT_PAGE


def draw_plot(reports: list[RunReport], stem: str, path: Path) -> Path | None:
    """One PNG with every run's curves of one kind; None when no run recorded that kind."""
    from matplotlib.figure import Figure

    title, y_label, curves, log_scale = PLOTS[stem]
    figure = Figure(figsize=(8, 4.2), dpi=110, layout="constrained")
    axes = figure.add_subplot()
    drawn = 0
    for report in reports:
        for curve_name, suffix in curves:
            curve = report.log.curves[curve_name]
            if not len(curve):
                continue
            values = [v / 2**30 for v in curve.values] if stem == "memory_bytes" else curve.values
            label = " ".join(part for part in (report.log.name if len(reports) > 1 else "", suffix) if part)
            style = {"marker": "o", "linestyle": "--"} if curve_name == "val_loss" else {}
            axes.plot(curve.steps, values, label=label or None, **style)
            drawn += 1
    if not drawn:
        return None
    axes.set(title=title, xlabel="step", ylabel=y_label)
    if log_scale:
        axes.set_yscale("log")
    axes.grid(alpha=0.3)
    if any(line.get_label() and not line.get_label().startswith("_") for line in axes.lines):
        axes.legend()
    figure.savefig(path)
    return path


def render_page(reports: list[RunReport], images: dict[str, Path]) -> str:
    names = ", ".join(report.log.name for report in reports)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>llmctl report: {html.escape(names)}</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>llmctl report: {html.escape(names)}</h1>",
        f"<p class='muted'>written {time.strftime('%Y-%m-%d %H:%M:%S %z')}</p>",
        "<h2>Final metrics</h2>",
        metrics_table(reports),
        "<h2>Curves</h2>",
    ]
    for stem, path in images.items():
        encoded = base64.b64encode(path.read_bytes()).decode("ascii")
        parts.append(f"<img alt='{html.escape(PLOTS[stem][0])}' src='data:image/png;base64,{encoded}'>")
    for report in reports:
        parts.append(run_section(report))
    parts.append("</body></html>")
    return "\n".join(parts)


def metrics_table(reports: list[RunReport]) -> str:
    rows = [summary(report.log) for report in reports]
    head = "".join(f"<th>{html.escape(report.log.name)}</th>" for report in reports)
    body = "".join(
        f"<tr><th>{html.escape(label)}</th>"
        + "".join(f"<td>{html.escape(row[label])}</td>" for row in rows)
        + "</tr>"
        for label in rows[0]
        if label != "ETA"
    )
    return f"<table><tr><th></th>{head}</tr>{body}</table>"


def run_section(report: RunReport) -> str:
    log = report.log
    parts = [f"<h2>{html.escape(log.name)}</h2>", f"<p class='muted'>{html.escape(str(log.run_dir))}</p>"]
    for path, record in report.evals:
        parts.append(f"<h3>Evaluation: {html.escape(path.name)}</h3>")
        parts.append(f"<p class='muted'>checkpoint {html.escape(str(record.get('checkpoint')))}</p>")
        rows = "".join(
            f"<tr><td>{html.escape(task)}</td><td>{html.escape(metric)}</td><td>{format_number(value)}</td></tr>"
            for (task, metric), value in flatten(record["results"]).items()
        )
        parts.append(f"<table><tr><th>task</th><th>metric</th><th>value</th></tr>{rows}</table>")
    if log.samples:
        parts.append(f"<h3>Samples at step {log.samples[0].get('step')}</h3>")
        parts += [
            f"<p><b>{html.escape(str(s.get('prompt')))}</b> &rarr; {html.escape(str(s.get('text')))}</p>"
            for s in log.samples
        ]
    events = [e for e in log.events if e.get("event") != "checkpoint"]
    if events:
        items = "".join(
            f"<li>step {e.get('step')}: {html.escape(e.get('event', ''))} "
            f"{html.escape(str(e.get('checkpoint') or e.get('path') or e.get('grad_norm') or ''))}</li>"
            for e in events
        )
        parts.append(f"<h3>Events</h3><ul>{items}</ul>")
    if report.recipe is not None:
        parts.append(f"<h3>Recipe</h3><pre>{html.escape(report.recipe)}</pre>")
    return "\n".join(parts)


def format_number(value: float) -> str:
    return f"{int(value):,}" if value.is_integer() and abs(value) < 1e15 else f"{value:.4g}"


STYLE = """
body { font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
table { border-collapse: collapse; margin: 0.5rem 0 1.5rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.6rem; text-align: left; }
td { font-variant-numeric: tabular-nums; }
img { max-width: 100%; display: block; margin: 0.5rem 0 1rem; }
pre { background: #f5f5f5; padding: 0.75rem; overflow-x: auto; }
.muted { color: #777; }
"""
