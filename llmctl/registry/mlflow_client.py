"""Where the registry lives and the MLflow client that talks to it: MLflow is an optional extra, so its
absence is one clear line, never an ImportError."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from llmctl.errors import UserError

if TYPE_CHECKING:
    from mlflow import MlflowClient

DEFAULT_STORE = Path("runs") / "mlflow.db"
TRAINING_RUN_FILE = "mlflow_run_id"  # in a run directory: the MLflow run its training logged to
MISSING = "MLflow is not installed; install the registry extra: pip install 'llmctl[registry]'"


def tracking_uri(explicit: str | None = None) -> str:
    """--registry URI, else MLFLOW_TRACKING_URI (a team's tracking server), else a SQLite file under runs/."""
    chosen = explicit or os.environ.get("MLFLOW_TRACKING_URI")
    if chosen:
        return chosen
    DEFAULT_STORE.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{DEFAULT_STORE.resolve()}"


def mlflow_client(uri: str | None = None) -> MlflowClient:
    """A client whose tracking and registry stores are both `uri` (MLFLOW_REGISTRY_URI still wins for the
    registry where set, as in MLflow itself)."""
    try:
        from mlflow import MlflowClient
    except ImportError:
        raise UserError(MISSING) from None
    for name in ("mlflow", "alembic"):  # schema set-up on a new store logs at INFO on stderr
        logging.getLogger(name).setLevel(logging.WARNING)
    uri = tracking_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=os.environ.get("MLFLOW_REGISTRY_URI") or uri)
