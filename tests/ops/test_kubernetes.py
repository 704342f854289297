"""deploy/kubernetes: valid against the Kubernetes API schemas (offline, strict), and wired to Lethe as it is.

Beyond the schemas: every ``LETHE_*`` variable the pods set is a setting the server accepts, the
probes ask for the health services the server reports (``lethe.primary`` only on the lease holder),
and every Service, budget and autoscaler selects the pods it is meant for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from server.config import load_config
from server.lease import PRIMARY_SERVICE
from server.rpc import SERVICE_NAME

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
#: The Kubernetes version the manifests are checked against (the newest the validator bundles).
VERSION = kubernetes_validate.latest_version()


def _documents() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    documents = []
    for name in kustomization["resources"]:
        documents += [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d]
    return documents


def _by_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in _documents() if d["kind"] == kind}


def test_every_file_is_listed_and_every_resource_is_valid() -> None:
    listed = set(yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())["resources"])
    assert listed == {p.name for p in DEPLOY.glob("*.yaml")} - {"kustomization.yaml"}
    for document in _documents():
        kubernetes_validate.validate(document, VERSION, strict=True)


def test_a_misspelled_field_is_caught() -> None:
    """The check above can fail: strict validation rejects a field the API does not have."""
    service = dict(_by_kind("Service")["lethe-write"])
    service["spec"] = {**service["spec"], "selectr": {}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(service, VERSION, strict=True)


def _containers() -> dict[str, dict[str, Any]]:
    workloads = {**_by_kind("StatefulSet"), **_by_kind("Deployment")}
    return {name: w["spec"]["template"]["spec"]["containers"][0] for name, w in workloads.items()}


@pytest.mark.parametrize("workload", ["lethe-primary", "lethe-replica"])
def test_the_pods_settings_are_settings_the_server_accepts(workload: str, tmp_path: Path) -> None:
    container = _containers()[workload]
    env = {e["name"]: e["value"] for e in container["env"]}
    secret = _by_kind("Secret")["lethe"]["stringData"]
    keys = {m["mountPath"] for m in container["volumeMounts"] if m["name"] == "keys"}
    assert keys == {"/keys"}
    for name, value in env.items():  # the keys Secret's files, here under tmp_path (the server checks they exist)
        if value.startswith("/keys/"):
            (tmp_path / Path(value).name).write_bytes(b"key")
            env[name] = str(tmp_path / Path(value).name)
    config = load_config(env={**env, **secret})  # raises ConfigError naming any unknown or bad value
    assert config.server.role == {"lethe-primary": "primary", "lethe-replica": "replica"}[workload]
    assert config.server.host == "0.0.0.0" and config.server.metrics_host == "0.0.0.0"
    assert config.database_url.startswith("postgresql")  # a standby and replicas need PostgreSQL
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": config.server.port, "metrics": config.server.metrics_port}
    assert {m["mountPath"] for m in container["volumeMounts"]} == {config.storage.data_dir, "/keys"}
    # No volume is shared: blobs are in the database, and both keys come from the Secret.
    assert config.storage.blob_url == "postgresql"
    assert config.audit.signing_key_file and config.storage.sample_id_key_file


def test_only_the_lease_holder_is_ready_among_the_primaries_and_replicas_are_ready_when_following() -> None:
    containers = _containers()
    assert containers["lethe-primary"]["readinessProbe"]["grpc"]["service"] == PRIMARY_SERVICE
    assert containers["lethe-replica"]["readinessProbe"]["grpc"]["service"] == SERVICE_NAME
    primary = _by_kind("StatefulSet")["lethe-primary"]["spec"]
    assert primary["replicas"] == 2 and primary["updateStrategy"]["type"] == "OnDelete"
    grace = primary["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > load_config(env={}).server.grace_seconds  # SIGTERM drains before the kill


def _labels(workload: dict[str, Any]) -> dict[str, str]:
    labels: dict[str, str] = workload["spec"]["template"]["metadata"]["labels"]
    return labels


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def test_services_budgets_and_the_autoscaler_select_the_right_pods() -> None:
    primary = _labels(_by_kind("StatefulSet")["lethe-primary"])
    replica = _labels(_by_kind("Deployment")["lethe-replica"])
    services = _by_kind("Service")
    assert _selects(services["lethe-write"]["spec"]["selector"], primary)
    assert not _selects(services["lethe-write"]["spec"]["selector"], replica)
    assert _selects(services["lethe-read"]["spec"]["selector"], primary)
    assert _selects(services["lethe-read"]["spec"]["selector"], replica)
    assert _by_kind("StatefulSet")["lethe-primary"]["spec"]["serviceName"] == "lethe-primaries"
    budgets = _by_kind("PodDisruptionBudget")
    assert _selects(budgets["lethe-primary"]["spec"]["selector"]["matchLabels"], primary)
    assert _selects(budgets["lethe-replica"]["spec"]["selector"]["matchLabels"], replica)
    target = _by_kind("HorizontalPodAutoscaler")["lethe-replica"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "lethe-replica")
    # No shared volume (blobs are in PostgreSQL): each primary has a small claim of its own, replicas none.
    assert _by_kind("PersistentVolumeClaim") == {}
    (claim,) = _by_kind("StatefulSet")["lethe-primary"]["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "data" and claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    volumes = {v["name"]: v for v in _by_kind("Deployment")["lethe-replica"]["spec"]["template"]["spec"]["volumes"]}
    assert "emptyDir" in volumes["data"] and volumes["keys"]["secret"]["secretName"] == "lethe-keys"


def test_the_compose_file_runs_two_primaries_and_two_replicas_on_one_database(tmp_path: Path) -> None:
    compose = yaml.safe_load((DEPLOY.parent / "docker-compose.ha.yml").read_text())
    services = compose["services"]
    roles = {}
    keys = services.pop("lethe-keys")
    assert keys["volumes"] == ["lethe-keys:/keys"] and "entrypoint" in keys
    for name, service in services.items():
        if name == "postgres":
            continue
        env = {k: v for k, v in service["environment"].items() if not v.startswith("${LETHE_AUTH_TOKENS")}
        for key, value in env.items():  # the keys lethe-keys creates, here under tmp_path
            if value.startswith("/keys/"):
                (tmp_path / Path(value).name).write_bytes(b"key")
                env[key] = str(tmp_path / Path(value).name)
        config = load_config(env=env)
        roles[name] = config.server.role
        assert config.database_url.startswith("postgresql") and "@postgres:5432/" in config.database_url
        # Blobs in the database: each server's data directory is its own; only the keys are shared.
        assert config.storage.blob_url == "postgresql"
        assert "lethe-keys:/keys:ro" in service["volumes"]
        assert not any(v.endswith(":/data") for v in service["volumes"] if v.startswith("lethe-data"))
        assert service["depends_on"]["postgres"]["condition"] == "service_healthy"
        assert service["depends_on"]["lethe-keys"]["condition"] == "service_completed_successfully"
    assert sorted(roles.values()) == ["primary", "primary", "replica", "replica"]
    published = [s["ports"][0].split(":")[1] for n, s in services.items() if n != "postgres"]
    assert len(set(published)) == 4
