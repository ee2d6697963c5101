"""The loggers a recipe's `train.loggers` names, each fed a run's step and eval numbers by the metrics
writer: TensorBoard (when installed) and MLflow (the tracking store the model registry uses)."""

from __future__ import annotations

import contextlib
import time
import warnings
from pathlib import Path

from llmctl.atomic import atomic_write_text
from llmctl.registry.lineage import dotted_keys
from llmctl.registry.mlflow_client import TRAINING_RUN_FILE, mlflow_client
from llmctl.train.metrics import ScalarLogger

MLFLOW_BATCH = 100  # params per log_batch call, MLflow's limit
MLFLOW_PARAM_LENGTH = 6000


class TensorBoardLogger:
    def __init__(self, run_dir: Path, resume_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=resume_step)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)

    def close(self, finished: bool) -> None:
        self.writer.close()


class MLflowLogger:
    """The recipe as an MLflow run's params and the numbers as its metrics, in the experiment named after the
    recipe. A resumed run continues its MLflow run (the id is kept in the run directory, where `llmctl models
    register` finds it to link a version to its training). A tracking server that fails mid-run is said once
    and training goes on: metrics.jsonl still has every number."""

    def __init__(
        self, run_dir: Path, experiment: str, params: dict[str, str], resume_step: int | None
    ) -> None:
        self.client = mlflow_client()  # first: it says so when MLflow is not installed
        from mlflow.entities import Param

        id_file = Path(run_dir) / TRAINING_RUN_FILE
        run_id = id_file.read_text().strip() if resume_step is not None and id_file.is_file() else ""
        if run_id:
            self.client.update_run(run_id, status="RUNNING")
        else:
            found = self.client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
            run = self.client.create_run(
                experiment_id,
                run_name=Path(run_dir).name,
                tags={"llmctl.run_dir": str(Path(run_dir).resolve())},
            )
            run_id = run.info.run_id
            items = [Param(key, value[:MLFLOW_PARAM_LENGTH]) for key, value in sorted(params.items())]
            for start in range(0, len(items), MLFLOW_BATCH):
                self.client.log_batch(run_id, params=items[start : start + MLFLOW_BATCH])
            atomic_write_text(id_file, run_id + "\n")
        self.run_id = run_id
        self.failed = False

    def log(self, step: int, scalars: dict[str, float]) -> None:
        from mlflow.entities import Metric

        if self.failed:
            return
        now = int(time.time() * 1000)
        try:
            self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in scalars.items()])
        except Exception as error:  # any failure of the tracking store: training must not die of it
            self.failed = True
            warnings.warn(
                f"MLflow logging stopped at step {step} ({error}); metrics.jsonl has every number",
                stacklevel=2,
            )

    def close(self, finished: bool) -> None:
        if not self.failed:
            self.client.set_terminated(self.run_id, status="FINISHED" if finished else "KILLED")


def open_loggers(
    names: list[str], run_dir: Path, experiment: str, recipe: dict, resume_step: int | None
) -> list[ScalarLogger]:
    loggers: list[ScalarLogger] = []
    if "tensorboard" in names:
        with contextlib.suppress(ImportError):  # TensorBoard is optional; metrics.jsonl has everything
            loggers.append(TensorBoardLogger(run_dir, resume_step))
    if "mlflow" in names:
        loggers.append(MLflowLogger(run_dir, experiment, dotted_keys(recipe), resume_step))
    return loggers
