"""Training metrics: `metrics.jsonl` (the single source for the TUI and plots), copied to the recipe's
loggers (TensorBoard, MLflow), and the device peak that MFU is measured against."""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import torch

from llmctl.append_log import open_append_log, parse_record
from llmctl.train.run_log import METRICS_FILE

SCALAR_EVENTS = ("step", "eval")  # the events whose numbers go to the loggers

# Dense bf16 tensor-core peaks (FLOP/s) of common training GPUs, by a substring of the device name.
GPU_BF16_PEAKS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
    "L4": 121e12,
    "4090": 165e12,
}


def measure_cpu_matmul_peak(
    size: int = 2048, trials: int = 5, dtype: torch.dtype = torch.float32, fresh: bool = False
) -> float:
    """GEMM FLOP/s this CPU reaches in `dtype` with the current thread count: the ceiling CPU MFU is quoted
    against, by the trainer and the benchmarks alike. Best of several trials, so a busy neighbour does not
    deflate it; measured once per process, thread count and dtype, unless `fresh`."""
    measure = _cpu_matmul_peak.__wrapped__ if fresh else _cpu_matmul_peak
    return measure(torch.get_num_threads(), size, trials, dtype)


@functools.cache
def _cpu_matmul_peak(threads: int, size: int, trials: int, dtype: torch.dtype) -> float:
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    best = 0.0
    for _ in range(trials):
        started = time.perf_counter()
        a @ b
        best = max(best, 2 * size**3 / (time.perf_counter() - started))
    return best


# The dtype autocast computes matmuls in, by recipe precision (fp32: no autocast). A CPU with AVX512_BF16 or
# AMX multiplies bf16 at twice its fp32 rate or more, so its MFU is quoted against the bf16 GEMM peak.
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def device_peak_flops(device: torch.device, precision: str, fresh: bool = False) -> float | None:
    """The CPU's measured GEMM peak (`fresh`: measured again now), or a GPU's rated one."""
    if device.type == "cpu":
        return measure_cpu_matmul_peak(dtype=AUTOCAST_DTYPES.get(precision, torch.float32), fresh=fresh)
    name = torch.cuda.get_device_name(device)
    for key, peak in GPU_BF16_PEAKS.items():
        if key in name:
            return (
                peak if precision in ("bf16", "fp16") else peak / 2
            )  # TF32 tensor cores: half the bf16 rate
    return None


def memory_in_use(device: torch.device) -> float:
    """Peak bytes allocated on a GPU; resident set size of this process on CPU."""
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device))
    try:
        with open("/proc/self/statm") as handle:
            return float(int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE"))
    except OSError:
        return float("nan")


class ScalarLogger(Protocol):
    """Somewhere besides metrics.jsonl that a run's numbers go (TensorBoard, MLflow)."""

    def log(self, step: int, scalars: dict[str, float]) -> None: ...

    def close(self, finished: bool) -> None: ...


class MetricsWriter:
    """Appends one JSON object per record, never rewriting what is there: a resumed run appends after a
    `resumed` record, and `read_metrics` drops what it supersedes. A line a crash left half-written is closed
    first, so it spoils only itself. Step and eval numbers are copied to `loggers`."""

    def __init__(
        self, run_dir: Path, loggers: Sequence[ScalarLogger] = (), file_name: str = METRICS_FILE
    ) -> None:
        self.path = Path(run_dir) / file_name
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = os.fdopen(open_append_log(self.path), "a", encoding="utf-8")
        self.loggers = list(loggers)
        self.finished = False

    def write(self, record: dict) -> None:
        self.handle.write(json.dumps(record) + "\n")
        self.handle.flush()
        self.finished = self.finished or record.get("event") == "finished"
        if self.loggers and record.get("event") in SCALAR_EVENTS:
            scalars = {
                key: float(value)
                for key, value in record.items()
                if key != "step" and isinstance(value, int | float) and not isinstance(value, bool)
            }
            for logger in self.loggers:
                logger.log(record["step"], scalars)

    def close(self) -> None:
        self.handle.close()
        for logger in self.loggers:
            logger.close(self.finished)


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of a run as they stand: lines that are not JSON objects (a crash's half-written last
    line) are skipped, and a `resumed` record at step s drops the earlier records after s, which the resumed
    run redoes."""
    path = Path(run_dir) / METRICS_FILE
    records: list[dict] = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        record = parse_record(line)
        if record is None:
            continue
        if record.get("event") == "resumed":
            records = [r for r in records if r.get("step", 0) <= record.get("step", 0)]
        records.append(record)
    return records
