"""Where the registry lives and the MLflow client that talks to it: MLflow is an optional extra, so its
absence is one clear line, never an ImportError."""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from llmctl.errors import UserError

if TYPE_CHECKING:
    from mlflow import MlflowClient

DEFAULT_STORE = Path("runs") / "mlflow.db"
TRAINING_RUN_FILE = "mlflow_run_id"  # in a run directory: the MLflow run its training logged to
MISSING = "MLflow is not installed; install the registry extra: pip install 'llmctl[registry]'"
# the stores MLflow's registry speaks to (a database URI may name its driver: postgresql+psycopg2)
SCHEMES = {
    "",
    "file",
    "sqlite",
    "postgresql",
    "mysql",
    "mssql",
    "http",
    "https",
    "databricks",
    "databricks-uc",
    "uc",
}
SQLITE_HEADER = b"SQLite format 3\x00"
# MLflow retries an unreachable server for minutes by default; a command should say so within seconds
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
HTTP_DEFAULTS |= {"MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


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
    registry = os.environ.get("MLFLOW_REGISTRY_URI") or uri
    for store in {uri, registry}:
        check_store(store)
    for name, value in HTTP_DEFAULTS.items():  # a user's own settings win
        os.environ.setdefault(name, value)
    with store_creation_lock(uri):
        try:
            return MlflowClient(tracking_uri=uri, registry_uri=registry)
        except Exception as error:  # MLflow and SQLAlchemy raise many kinds while opening a store
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise UserError(f"cannot open the model registry at {uri}: {reason}") from None


@contextmanager
def store_creation_lock(uri: str) -> Iterator[None]:
    """For an SQLite store, an exclusive lock beside the database while MLflow opens it: opening a new store
    creates its tables, and two commands creating them at once fail each other's migrations."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    database = Path(uri.removeprefix("sqlite:///"))
    database.parent.mkdir(parents=True, exist_ok=True)
    with open(database.parent / f".{database.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def check_store(uri: str) -> None:
    """One line for a store MLflow cannot open, before MLflow tries (and retries): an unknown scheme, or an
    SQLite path that is a directory or a file that is not an SQLite database."""
    scheme = urlparse(uri).scheme.split("+")[0] if "://" in uri else ""
    if scheme not in SCHEMES:
        raise UserError(
            f"the model registry {uri}: MLflow cannot keep a registry at a {scheme}:// URI; use sqlite:///PATH, "
            "a database URI or an http(s):// tracking server"
        )
    if scheme != "sqlite":
        return
    path = Path(uri.removeprefix("sqlite:///"))
    if path.is_dir():
        raise UserError(
            f"the model registry {uri}: {path} is a directory; name a database file in it, e.g. {path / 'mlflow.db'}"
        )
    if path.is_file() and path.stat().st_size:
        with path.open("rb") as handle:
            if handle.read(len(SQLITE_HEADER)) != SQLITE_HEADER:
                raise UserError(
                    f"the model registry {uri}: {path} is not an SQLite database (damaged, or another file); "
                    "restore it from a backup or point --registry elsewhere"
                )
