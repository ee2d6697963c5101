"""Checkpoints kept in the tracking store's artefacts rather than at a local path: what a team's MLflow
tracking server accepts as a version's source (it refuses local paths), uploaded at registration and
downloaded once into a local cache when the version is used."""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.parse
from pathlib import Path

from llmctl.atomic import atomic_directory
from llmctl.digests import DIGEST_FILE

UPLOAD_EXPERIMENT = "llmctl-models"
ARTIFACT_PATH = "checkpoint"
NOT_UPLOADED = ("trainer_state.pt",)  # optimizer state for resuming: twice the weights, never served
SERVER_SCHEMES = ("http", "https", "databricks")


def is_tracking_server(uri: str) -> bool:
    return urllib.parse.urlparse(uri).scheme in SERVER_SCHEMES


def is_local_source(source: str) -> bool:
    return urllib.parse.urlparse(source).scheme in ("", "file")


def upload_checkpoint(client, checkpoint: Path, uri: str, run_name: str) -> tuple[str, str]:
    """Log the checkpoint's files as artefacts of a run of their own; (run id, `runs:/` source). Its digest
    manifest goes with it, less the files left behind, so the downloaded copy is checked file by file."""
    found = client.get_experiment_by_name(UPLOAD_EXPERIMENT)
    experiment_id = (
        found.experiment_id
        if found
        else client.create_experiment(UPLOAD_EXPERIMENT, artifact_location=_local_artifact_root(uri))
    )
    run_id = client.create_run(
        experiment_id, run_name=run_name, tags={"llmctl.checkpoint": str(checkpoint)}
    ).info.run_id
    for path in sorted(checkpoint.iterdir()):
        if path.is_file() and path.name not in (*NOT_UPLOADED, DIGEST_FILE):
            client.log_artifact(run_id, str(path), ARTIFACT_PATH)
    manifest = checkpoint / DIGEST_FILE
    if manifest.is_file():
        kept = [
            line
            for line in manifest.read_text().splitlines(keepends=True)
            if line.split("  ")[-1].strip() not in NOT_UPLOADED
        ]
        with tempfile.TemporaryDirectory() as scratch:
            (Path(scratch) / DIGEST_FILE).write_text("".join(kept))
            client.log_artifact(run_id, str(Path(scratch) / DIGEST_FILE), ARTIFACT_PATH)
    client.set_terminated(run_id)
    return run_id, f"runs:/{run_id}/{ARTIFACT_PATH}"


def _local_artifact_root(uri: str) -> str | None:
    """Beside a SQLite store, its artefacts (MLflow would put them under the current directory); a server
    chooses its own."""
    if not uri.startswith("sqlite:///"):
        return None
    database = Path(uri.removeprefix("sqlite:///"))  # sqlite:////abs/path.db or sqlite:///relative.db
    return (database.resolve().parent / "mlflow-artifacts").as_uri()


def cached_copy(source: str, tracking_uri: str, name: str, version: int) -> Path:
    """The version's checkpoint in the local cache (LLMCTL_MODEL_CACHE, default ~/.cache/llmctl/models),
    downloaded first if it is not there; a download cut short leaves nothing behind."""
    root = Path(os.environ.get("LLMCTL_MODEL_CACHE") or Path.home() / ".cache" / "llmctl" / "models")
    store = hashlib.sha256(tracking_uri.encode()).hexdigest()[:12]
    target = root.expanduser() / store / name / str(version)
    if target.is_dir():
        return target
    from mlflow.artifacts import download_artifacts

    with atomic_directory(target) as staging:
        download_artifacts(artifact_uri=source, dst_path=str(staging), tracking_uri=tracking_uri)
        for path in (staging / ARTIFACT_PATH).iterdir():
            path.rename(staging / path.name)
        (staging / ARTIFACT_PATH).rmdir()
    return target
