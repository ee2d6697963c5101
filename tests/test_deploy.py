"""The deployment files: every Kubernetes manifest is a valid API object (it survives the official client's
deserializer unchanged), and its ports, probes, secret and names agree with `llmctl serve` and the Dockerfile."""

from __future__ import annotations

import json
import re

import pytest
import typer.main
import yaml
from conftest import REPO

kubernetes = pytest.importorskip("kubernetes")

MANIFESTS = sorted((REPO / "deploy" / "k8s").glob("*.yaml"))
TYPES = {
    ("apps/v1", "Deployment"): "V1Deployment",
    ("v1", "Service"): "V1Service",
    ("v1", "PersistentVolumeClaim"): "V1PersistentVolumeClaim",
    ("autoscaling/v2", "HorizontalPodAutoscaler"): "V2HorizontalPodAutoscaler",
}


def documents() -> dict[str, dict]:
    found = {}
    for path in MANIFESTS:
        for document in yaml.safe_load_all(path.read_text()):
            found[document["kind"]] = document
    return found


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_each_manifest_is_an_api_object_with_no_unknown_field(path):
    client = kubernetes.client.ApiClient()
    for document in yaml.safe_load_all(path.read_text()):
        type_name = TYPES[(document["apiVersion"], document["kind"])]
        parsed = client.deserialize(json.dumps(document), type_name, "application/json")
        # a misspelt or misplaced field would be dropped here, and the round trip would differ
        assert client.sanitize_for_serialization(parsed) == document


def test_manifests_and_image_agree_with_llmctl_serve():
    from llmctl.commands.serve import app as serve_app
    from llmctl.infer.server import create_app

    found = documents()
    assert set(found) == {"Deployment", "Service", "PersistentVolumeClaim", "HorizontalPodAutoscaler"}
    deployment = found["Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    (port,) = container["ports"]

    dockerfile = (REPO / "Dockerfile").read_text()
    entrypoint = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", dockerfile, re.M).group(1))
    assert entrypoint[:2] == ["llmctl", "serve"] and entrypoint[entrypoint.index("--host") + 1] == "0.0.0.0"
    assert int(entrypoint[entrypoint.index("--port") + 1]) == port["containerPort"]
    assert re.search(rf"^EXPOSE {port['containerPort']}$", dockerfile, re.M)

    routes = {route.path for route in create_app({}).routes}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert (
            container[probe]["httpGet"]["path"] in routes
            and container[probe]["httpGet"]["port"] == port["name"]
        )
    assert found["Service"]["spec"]["ports"][0]["targetPort"] == port["name"]
    assert found["Service"]["spec"]["selector"] == deployment["spec"]["template"]["metadata"]["labels"]
    assert (
        found["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    )

    api_key = next(p for p in typer.main.get_command(serve_app).params if p.name == "api_key")
    (env,) = container["env"]
    assert env["name"] == api_key.envvar and "secretKeyRef" in env["valueFrom"]
    (volume,) = deployment["spec"]["template"]["spec"]["volumes"]
    assert volume["persistentVolumeClaim"]["claimName"] == found["PersistentVolumeClaim"]["metadata"]["name"]
    assert container["volumeMounts"][0]["mountPath"] == "/models" and 'VOLUME ["/models"]' in dockerfile
