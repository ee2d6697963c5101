"""What watching costs: training tokens/s of recipes/tiny.toml with `llmctl monitor` following the run and
without, alternating in one run so drift in the machine's load hits both. The monitor runs headless in its own
process on a pseudo-terminal of 120 x 40 (the escape codes it draws are read and dropped, so a terminal
emulator's own drawing is not counted), polling once a second and at the lowest CPU priority, as `llmctl
monitor` runs by default; its CPU seconds are read from /proc.

    .venv/bin/python -m benchmarks.monitor_overhead [--pairs 2] [--steps 120]
"""

from __future__ import annotations

import argparse
import fcntl
import os
import pty
import statistics
import struct
import subprocess
import sys
import tempfile
import termios
import threading
from pathlib import Path

from benchmarks.common import machine
from llmctl.train.run_log import RunLog

REPO = Path(__file__).resolve().parent.parent
TERMINAL = (40, 120)  # rows, columns


def prepare(work: Path) -> dict[str, Path]:
    """The sample corpus built, a 4096-piece tokenizer and its token files, as `make demo` makes them."""
    from llmctl.data.corpus import CorpusOptions, build_corpus
    from llmctl.data.token_files import encode_corpus
    from llmctl.data.tokenizer import train_tokenizer

    sample = REPO / "data" / "sample"
    paths = {"corpus": work / "corpus", "tokenizer": work / "tokenizer", "tokens": work / "tokens"}
    build_corpus(
        [str(sample / "train.jsonl"), str(sample / "val.jsonl")],
        paths["corpus"],
        CorpusOptions(val_fraction=0.1),
    )
    train_tokenizer(paths["corpus"], paths["tokenizer"], vocab_size=4096)
    encode_corpus(paths["corpus"], paths["tokenizer"] / "tokenizer.model", paths["tokens"])
    return paths


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a live process (fields 14 and 15 of /proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_monitor(run_dir: Path) -> subprocess.Popen:
    """`llmctl monitor RUN_DIR` on a pseudo-terminal whose output a thread reads and drops."""
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", *TERMINAL, 0, 0))
    env = dict(os.environ, TERM="xterm-256color", COLUMNS=str(TERMINAL[1]), LINES=str(TERMINAL[0]))
    monitor = subprocess.Popen(
        [sys.executable, "-m", "llmctl", "monitor", str(run_dir)],
        cwd=REPO,
        stdin=terminal,
        stdout=terminal,
        stderr=terminal,
        env=env,
        start_new_session=True,
    )
    os.close(terminal)

    def drain() -> None:
        try:
            while os.read(controller, 65536):
                pass
        except OSError:
            pass  # the monitor closed the terminal

    threading.Thread(target=drain, daemon=True).start()
    return monitor


def train(paths: dict[str, Path], run_dir: Path, steps: int, watched: bool) -> tuple[float, float | None]:
    """(median logged tokens/s after the first window, the monitor's CPU seconds or None)."""
    command = [
        sys.executable, "-m", "llmctl", "train", str(REPO / "recipes" / "tiny.toml"), "--overwrite",
        "--set", f"checkpoint.dir={run_dir}", "--set", f"data.corpus={paths['corpus']}",
        "--set", f"data.tokens={paths['tokens']}",
        "--set", f"data.tokenizer={paths['tokenizer'] / 'tokenizer.model'}",
        "--set", f"train.steps={steps}",
    ]  # fmt: skip
    trainer = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL)
    monitor, monitor_cpu = None, None
    if watched:
        run_dir.mkdir(parents=True, exist_ok=True)
        monitor = start_monitor(run_dir)
    try:
        if trainer.wait() != 0:
            raise SystemExit(f"training failed: {' '.join(command)}")
        if monitor is not None:
            if monitor.poll() is not None:
                raise SystemExit("the monitor exited before training ended")
            monitor_cpu = cpu_seconds(monitor.pid)
    finally:
        if monitor is not None:
            monitor.kill()
            monitor.wait()
    speeds = [float(v) for v in RunLog(run_dir).read_all().curves["tokens_per_second"].values[1:]]
    return statistics.median(speeds), monitor_cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2, help="alternating (without, with) pairs")
    parser.add_argument("--steps", type=int, default=120)
    args = parser.parse_args()
    print(f"# monitor overhead: recipes/tiny.toml, {args.steps} steps; {machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        paths = prepare(Path(tmp))
        results: dict[bool, list[float]] = {False: [], True: []}
        for pair in range(args.pairs):
            for watched in (False, True):
                speed, monitor_cpu = train(paths, Path(tmp) / f"run-{pair}-{watched}", args.steps, watched)
                results[watched].append(speed)
                cpu = f", monitor used {monitor_cpu:.1f} CPU s" if monitor_cpu is not None else ""
                print(f"pair {pair}  {'with' if watched else 'without'} monitor: {speed:,.0f} tokens/s{cpu}")
    without, with_ = statistics.median(results[False]), statistics.median(results[True])
    print(
        f"median tokens/s  without {without:,.0f}  with {with_:,.0f}  ratio with/without {with_ / without:.3f}"
    )


if __name__ == "__main__":
    main()
