"""deploy/k8s: each overlay rendered with `kubectl kustomize` and every document validated against the
Kubernetes 1.30 schemas (kubernetes-validate, strict: no unknown fields); RBAC least privilege; the
engines' flags the same as the compose files'; the orchestrator's configuration loadable."""

from __future__ import annotations

import functools
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator.config import Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("native", "sglang", "tensorrt-llm")
KUBERNETES_VERSION = "1.30"
# overlay -> (compose file, its prefill service, its decode service)
COMPOSE = {"native": ("compose.native.yml", "prefill", "decode"),
           "sglang": ("compose.sglang.yml", "sglang-prefill", "sglang-decode"),
           "tensorrt-llm": ("compose.tensorrt-llm.yml", "trtllm-context", "trtllm-generation")}  # fmt: skip

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")


@functools.cache
def render(path: str) -> tuple[dict[str, Any], ...]:
    out = subprocess.run(["kubectl", "kustomize", path], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def of_kind(docs: tuple[dict[str, Any], ...], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def named(docs: tuple[dict[str, Any], ...], kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for d in of_kind(docs, kind) if d["metadata"]["name"] == name]
    return doc


def tetri_settings(docs: tuple[dict[str, Any], ...]) -> Settings:
    (config,) = [d for d in of_kind(docs, "ConfigMap") if d["metadata"]["name"].startswith("tetri-config")]
    return Settings(**yaml.safe_load(config["data"]["deploy.yaml"]))


def engines(docs: tuple[dict[str, Any], ...]) -> dict[str, dict[str, Any]]:
    """role -> the workload its k8s_pools entry scales."""
    out = {}
    for role, pool in tetri_settings(docs).k8s_pools.items():
        kind, name = pool.workload.split("/")
        out[role] = named(docs, {"deployment": "Deployment", "statefulset": "StatefulSet"}[kind], name)
    return out


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_document_is_valid_for_the_pinned_kubernetes(overlay: str) -> None:
    import kubernetes_validate

    docs = render(str(K8S / "overlays" / overlay))
    assert len(docs) >= 10
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{overlay}: {doc['kind']}/{doc['metadata']['name']}: {exc.message} at {list(exc.path)}")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rbac_is_least_privilege(overlay: str) -> None:
    docs = render(str(K8S / "overlays" / overlay))
    assert not of_kind(docs, "ClusterRole") and not of_kind(docs, "ClusterRoleBinding")
    (role,) = of_kind(docs, "Role")
    workloads = {w["metadata"]["name"] for w in engines(docs).values()}
    for rule in role["rules"]:
        for key in ("apiGroups", "resources", "verbs", "resourceNames"):
            assert not any("*" in v for v in rule.get(key, [])), f"wildcard in {key}: {rule}"
        if rule["resources"] == ["pods"]:
            assert rule["apiGroups"] == [""] and set(rule["verbs"]) == {"get", "list", "watch"}
            assert "resourceNames" not in rule  # a watch by label selector cannot name pods
        else:
            assert rule["apiGroups"] == ["apps"]
            assert set(rule["resources"]) <= {"deployments/scale", "statefulsets/scale"}
            assert set(rule["verbs"]) == {"get", "patch"}
            assert set(rule["resourceNames"]) == workloads  # exactly the pools' workloads
    assert sorted(r["resources"][0] for r in role["rules"]) == ["deployments/scale", "pods"]
    (binding,) = of_kind(docs, "RoleBinding")
    orchestrator = named(docs, "Deployment", "tetri-orchestrator")
    account = orchestrator["spec"]["template"]["spec"]["serviceAccountName"]
    ref = {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role["metadata"]["name"]}
    assert binding["roleRef"] == ref
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": "tetri"}]
    assert named(docs, "ServiceAccount", account)
    for doc in docs:
        if doc["kind"] == "Deployment":
            pod = doc["spec"]["template"]["spec"]
            # Kubernetes would set TETRI_PORT=tcp://... (the Service `tetri`): tetri reads TETRI_* as settings.
            assert pod["enableServiceLinks"] is False
            if doc["metadata"]["name"] != "tetri-orchestrator":  # the engines get no API token at all
                assert pod["automountServiceAccountToken"] is False


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_orchestrator_replicas_service_and_store(overlay: str) -> None:
    docs = render(str(K8S / "overlays" / overlay))
    orch = named(docs, "Deployment", "tetri-orchestrator")
    assert orch["spec"]["replicas"] == 2
    pod = orch["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["TETRI_REPLICA_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"  # distinct per replica
    assert env["TETRI_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {"name": "tetri-database", "key": "url"}
    assert env["TETRI_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "tetri-admin"
    (service,) = [s for s in of_kind(docs, "Service") if s["metadata"]["name"] == "tetri"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    # The in-cluster PostgreSQL (components/postgres) and the Secret the orchestrator reads.
    secret = named(docs, "Secret", "tetri-database")
    assert "url" in secret["data"]
    postgres = named(docs, "StatefulSet", "tetri-postgres")
    assert postgres["spec"]["volumeClaimTemplates"]
    settings = tetri_settings(docs)
    assert settings.pool_provider == "kubernetes" and set(settings.k8s_pools) == {"prefill", "decode"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_engine_pods_are_what_the_provider_selects(overlay: str) -> None:
    docs = render(str(K8S / "overlays" / overlay))
    settings = tetri_settings(docs)
    for role, workload in engines(docs).items():
        template = workload["spec"]["template"]
        labels = template["metadata"]["labels"]
        assert settings.k8s_match_labels.items() <= labels.items()
        assert labels[settings.k8s_role_label] == role
        assert workload["spec"]["selector"]["matchLabels"].items() <= labels.items()
        (container,) = template["spec"]["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert settings.k8s_pools[role].port in ports
        probe = container["readinessProbe"]["httpGet"]
        assert probe["path"] == "/health" and probe["port"] == settings.k8s_pools[role].port
        assert container["lifecycle"]["preStop"]  # keeps serving while the orchestrator drains it
        gpus = container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")
        assert gpus == (None if overlay == "native" else 1)


def _compose_command(overlay: str, service: str) -> list[str]:
    """The service's command in the compose file with every ${VAR:-default} at its default."""
    compose_file, *_ = COMPOSE[overlay]
    command = yaml.safe_load((ROOT / "docker" / compose_file).read_text())["services"][service]["command"]
    text = command if isinstance(command, str) else shlex.join(command)
    text = re.sub(r"\$\{(\w+):?-([^}]*)\}", lambda m: m.group(2), text)
    return shlex.split(text)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_engine_flags_are_the_compose_files(overlay: str) -> None:
    docs = render(str(K8S / "overlays" / overlay))
    _, prefill, decode = COMPOSE[overlay]
    for role, service in (("prefill", prefill), ("decode", decode)):
        (container,) = engines(docs)[role]["spec"]["template"]["spec"]["containers"]
        rendered = container.get("command", []) + container.get("args", [])
        if overlay == "native":  # the worker image's entrypoint (tetri worker ...) takes compose's command
            rendered = container["args"]
        assert rendered == _compose_command(overlay, service), role


def test_tensorrt_llm_worker_configs_are_docker_s() -> None:
    docs = render(str(K8S / "overlays" / "tensorrt-llm"))
    (config,) = [d for d in of_kind(docs, "ConfigMap") if d["metadata"]["name"].startswith("trtllm-config")]
    assert config["data"]["context.yaml"] == (ROOT / "docker" / "trtllm-context.yaml").read_text()
    assert config["data"]["generation.yaml"] == (ROOT / "docker" / "trtllm-generation.yaml").read_text()


def test_optional_pod_monitor(tmp_path: Path) -> None:
    """components/podmonitor on top of an overlay: a PodMonitor scraping the orchestrator's /metrics."""
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(K8S / "overlays" / "native", tmp_path)],
        "components": [os.path.relpath(K8S / "components" / "podmonitor", tmp_path)],
    }))  # fmt: skip
    docs = render(str(tmp_path))
    (monitor,) = of_kind(docs, "PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    orch = named(docs, "Deployment", "tetri-orchestrator")["spec"]["template"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= orch["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["path"] == "/metrics"
    assert endpoint["port"] in {p["name"] for p in orch["spec"]["containers"][0]["ports"]}
