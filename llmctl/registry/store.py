"""llmctl's models in MLflow's model registry: a registered version is an immutable pointer to a checkpoint
directory plus its lineage (tags), so a team's MLflow UI and tracking server show the same versions.

Registered versions are never rewritten: lineage tags are set once, at registration; `attach` only adds an
`llmctl.eval.<label>` tag, and aliases move between versions as MLflow's do."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from llmctl.digests import digest_problem, file_sha256, files_sha256, weights_sha256
from llmctl.errors import UserError
from llmctl.evaluate.results import flatten
from llmctl.registry.artifacts import cached_copy, is_local_source, is_tracking_server, upload_checkpoint
from llmctl.registry.lineage import TAG_PREFIX, Lineage, read_lineage
from llmctl.registry.mlflow_client import TRAINING_RUN_FILE, mlflow_client, tracking_uri
from llmctl.registry.reference import LATEST, ModelReference, check_model_name, parse_reference

EVAL_TAG = TAG_PREFIX + "eval."


@dataclass(frozen=True)
class ModelVersion:
    name: str
    version: int
    source: str  # a local path, or a `runs:/` artefact URI for an uploaded checkpoint
    aliases: tuple[str, ...]
    created: float  # seconds since the epoch
    note: str
    tags: dict[str, str]
    run_id: str | None

    @property
    def reference(self) -> str:
        return f"{self.name}@{self.version}"

    def lineage(self, key: str) -> str | None:
        return self.tags.get(TAG_PREFIX + key)

    def evals(self) -> dict[str, dict]:
        """Attached evaluation results by label: {"file", "sha256", "created", "metrics": {name: value}}."""
        return {
            key.removeprefix(EVAL_TAG): json.loads(value)
            for key, value in sorted(self.tags.items())
            if key.startswith(EVAL_TAG)
        }


class ModelRegistry:
    def __init__(self, uri: str | None = None) -> None:
        self.uri = tracking_uri(uri)
        self.client = mlflow_client(self.uri)  # first: it says so when MLflow is not installed
        from mlflow.exceptions import MlflowException

        self._mlflow_error = MlflowException

    def register(
        self,
        checkpoint: Path,
        name: str,
        alias: str | None = None,
        note: str | None = None,
        upload: bool | None = None,
    ) -> ModelVersion:
        """A new version of `name` for the checkpoint directory, with its lineage; refused for a directory
        that is not a complete checkpoint, and for weights `name` already has as a version. `upload` copies
        the checkpoint into the store's artefacts (default: only for a tracking server, which refuses local
        paths); otherwise the version points at the directory where it is."""
        checkpoint = Path(checkpoint).resolve()
        check_model_name(name)
        if alias is not None:
            _check_alias(alias)
        problem = _checkpoint_problem(checkpoint)
        if problem:
            raise UserError(f"cannot register {checkpoint}: {problem}")
        lineage = read_lineage(checkpoint)
        same = self._versions_with_weights(lineage.weights_sha256, name)
        if same:
            raise UserError(
                f"these weights are already {same[0].reference}; give it another alias instead: "
                f"llmctl models alias {same[0].reference} ALIAS"
            )
        tags = lineage.tags()
        if parent_version := self._parent_version(lineage):
            tags[TAG_PREFIX + "parent_version"] = parent_version
        training_run = self._training_run_id(checkpoint)
        if training_run:
            tags[TAG_PREFIX + "training_run"] = training_run
        with self._errors():
            source, run_id = str(checkpoint), training_run
            if upload or (upload is None and is_tracking_server(self.uri)):
                run_id, source = upload_checkpoint(
                    self.client, checkpoint, self.uri, f"{name} {checkpoint.name}"
                )
            if not self.client.search_registered_models(filter_string=f"name = '{name}'"):
                try:
                    self.client.create_registered_model(name)
                except self._mlflow_error as error:  # a register running beside this one created it first
                    if getattr(error, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
                        raise
            created = self.client.create_model_version(
                name, source=source, run_id=run_id, tags=tags, description=note or ""
            )
        self._keep_the_first_of_concurrent(name, lineage.weights_sha256, int(created.version))
        with self._errors():
            if alias is not None:
                self.client.set_registered_model_alias(name, alias, created.version)
        return self.get(ModelReference(name, int(created.version), None))

    def _keep_the_first_of_concurrent(self, name: str, digest: str, version: int) -> None:
        """Two registers of the same weights started together both pass the check for an existing version;
        the later version is deleted and its register says which one stands."""
        same = sorted(self._versions_with_weights(digest, name), key=lambda found: found.version)
        if same and same[0].version != version:
            with self._errors():
                self.client.delete_model_version(name, str(version))
            raise UserError(
                f"these weights were registered as {same[0].reference} at the same time, by another "
                f"llmctl models register; give it another alias instead: llmctl models alias {same[0].reference} ALIAS"
            )

    def get(self, reference: ModelReference | str) -> ModelVersion:
        reference = _as_reference(reference)
        not_found = f"no registered model version {reference}"
        with self._errors(not_found):
            if reference.version is not None:
                found = self.client.get_model_version(reference.name, str(reference.version))
            elif reference.alias == LATEST:
                versions = self.versions(reference.name)
                if not versions:
                    raise UserError(f"{not_found}: {reference.name} has no versions")
                return versions[-1]
            else:
                found = self.client.get_model_version_by_alias(reference.name, reference.alias)
        return _version(found)

    def versions(self, name: str | None = None) -> list[ModelVersion]:
        """Every version (of one model), oldest first."""
        filter_string = f"name = '{name}'" if name else None
        with self._errors():
            found = [_version(v) for v in self.client.search_model_versions(filter_string=filter_string)]
            pointed = [  # a search leaves versions' aliases out: the registered models hold them
                (model.name, int(version), alias)
                for model in self.client.search_registered_models(
                    filter_string=filter_string, max_results=1000
                )
                for alias, version in (model.aliases or {}).items()
            ]
        found = [
            replace(v, aliases=tuple(sorted(a for n, ver, a in pointed if (n, ver) == (v.name, v.version))))
            for v in found
        ]
        return sorted(found, key=lambda v: (v.name, v.version))

    def set_alias(self, reference: ModelReference | str, alias: str) -> ModelVersion:
        _check_alias(alias)
        version = self.get(reference)
        with self._errors():
            self.client.set_registered_model_alias(version.name, alias, str(version.version))
        return self.get(ModelReference(version.name, version.version, None))

    def attach(
        self, reference: ModelReference | str, results: dict, file: Path, label: str, force: bool = False
    ) -> ModelVersion:
        """Add an `llmctl eval --out` results file's numbers to a version. Refused when the file says it was
        measured on other weights (unless `force`), or when the label is already taken."""
        version = self.get(reference)
        if not _LABEL.fullmatch(label):
            raise UserError(f"label {label!r} is not usable; use letters, digits, '.', '_' or '-'")
        if label in version.evals():
            raise UserError(f"{version.reference} already has results labelled {label!r}; pass --label NEW")
        measured_on = results.get("checkpoint_sha256")
        weights = version.lineage("weights_sha256")
        if measured_on and weights and measured_on != weights and not force:
            raise UserError(
                f"{file} was measured on other weights than {version.reference} (checkpoint_sha256 "
                f"{measured_on[:12]}… vs {weights[:12]}…); evaluate {version.reference} itself, or pass --force"
            )
        value = {
            "file": str(Path(file).resolve()),
            "sha256": file_sha256(file),
            "created": results.get("created"),
            "metrics": {
                f"{task}/{metric}": number for (task, metric), number in flatten(results["results"]).items()
            },
        }
        with self._errors():
            self.client.set_model_version_tag(
                version.name, str(version.version), EVAL_TAG + label, json.dumps(value)
            )
        return self.get(ModelReference(version.name, version.version, None))

    def resolve(self, reference: ModelReference | str) -> Path:
        """The checkpoint a version points at, after checking that its weights are the ones registered."""
        version = self.get(reference)
        asked = str(_as_reference(reference))
        if is_local_source(version.source):
            path = Path(version.source.removeprefix("file://"))
            if not path.is_dir():
                raise UserError(
                    f"{asked} (version {version.version}) points at {path}, which no longer exists; "
                    "restore it or register the checkpoint's new location as a new version"
                )
        else:
            with self._errors():
                path = cached_copy(version.source, self.uri, version.name, version.version)
        expected = version.lineage("weights_sha256")
        try:
            actual = weights_sha256(path)
        except FileNotFoundError:
            actual = None
        if expected is None or actual != expected:
            raise UserError(
                f"{asked} (version {version.version}): the weights in {path} changed since they were "
                f"registered (sha256 {str(actual)[:12]}… vs {str(expected)[:12]}…); register them as a new "
                "version, or restore the registered files"
            )
        expected = version.lineage("files_sha256")  # absent for versions registered before it was kept
        if expected is not None and (actual := files_sha256(path)) != expected:
            raise UserError(
                f"{asked} (version {version.version}): the files in {path} changed since they were registered "
                f"(config, tokenizer or template; sha256 {actual[:12]}… vs {expected[:12]}…); register them as "
                "a new version, or restore the registered files"
            )
        return path

    def _versions_with_weights(self, digest: str, name: str | None = None) -> list[ModelVersion]:
        filter_string = f"tags.`{TAG_PREFIX}weights_sha256` = '{digest}'"
        if name:
            filter_string += f" and name = '{name}'"
        with self._errors():
            found = self.client.search_model_versions(filter_string=filter_string)
        return sorted((_version(v) for v in found), key=lambda v: (v.name, v.version))

    def _parent_version(self, lineage: Lineage) -> str | None:
        """The registered version whose weights are the parent's, when the parent is still on disk."""
        if lineage.parent is None:
            return None
        from llmctl.checkpoint import model_directory

        parent = model_directory(Path(lineage.parent))
        try:
            digest = weights_sha256(parent)
        except (FileNotFoundError, OSError):
            return None
        same = self._versions_with_weights(digest)
        return same[0].reference if same else None

    @contextmanager
    def _errors(self, not_found: str | None = None) -> Iterator[None]:
        """MLflow's exceptions as one line: a missing version, an unreachable server, a rejected name."""
        try:
            yield
        except self._mlflow_error as error:
            missing = getattr(error, "error_code", "") == "RESOURCE_DOES_NOT_EXIST" or "not found" in str(
                error
            )
            if not_found and missing:  # an unknown alias is INVALID_PARAMETER_VALUE to MLflow
                raise UserError(f"{not_found}; see llmctl models list") from None
            message = str(getattr(error, "message", error)).splitlines()[0]
            raise UserError(f"the model registry refused: {message}") from None

    def _training_run_id(self, checkpoint: Path) -> str | None:
        """The MLflow run that trained a checkpoint (runs/NAME/checkpoints/step-N), where the run logged to
        this same tracking store."""
        recorded = checkpoint.parent.parent / TRAINING_RUN_FILE
        run_id = recorded.read_text().strip() if recorded.is_file() else ""
        if not run_id:
            return None
        try:
            self.client.get_run(run_id)
        except self._mlflow_error:
            return None
        return run_id


_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def _as_reference(reference: ModelReference | str) -> ModelReference:
    if isinstance(reference, ModelReference):
        return reference
    parsed = parse_reference(reference)
    if parsed is None:
        raise UserError(
            f"{reference!r} is not a model reference; write NAME@VERSION or NAME@ALIAS (e.g. demo@3)"
        )
    return parsed


def _check_alias(alias: str) -> None:
    if alias.isdigit() or alias == LATEST or not _LABEL.fullmatch(alias):
        raise UserError(
            f"alias {alias!r} is not usable; use a word such as prod or staging (not a number, not 'latest')"
        )


def _checkpoint_problem(path: Path) -> str | None:
    if not path.is_dir():
        return "it is not a directory"
    if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
        return "it is not a checkpoint (no config.json or adapter_config.json); for a run directory, pass one of its checkpoints"
    if not any(path.glob("*.safetensors")):
        return "it holds no .safetensors weights"
    return digest_problem(path)


def _version(found) -> ModelVersion:
    return ModelVersion(
        name=found.name,
        version=int(found.version),
        source=found.source,
        aliases=tuple(sorted(found.aliases or ())),
        created=(found.creation_timestamp or 0) / 1000,
        note=found.description or "",
        tags=dict(found.tags or {}),
        run_id=found.run_id or None,
    )
