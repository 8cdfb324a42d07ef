"""deploy/ is checked against the code: the files load, the settings they set are valid,
the paths and ports agree, and every metric an alert uses exists."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml

from gateway.config.settings import load_settings
from gateway.errors import SettingsError
from gateway.policy.store import PolicyStore
from gateway.testing.device import FakeDevice
from gateway.testing.harness import gateway_with_upstream
from gateway.testing.issuer import TestIssuer

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
GRACE = 30  # the --grace every deploy file passes to `gateway serve`


def k8s_objects() -> dict[tuple[str, str], dict[str, Any]]:
    objects = {}
    for path in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document and "kind" in document and document["kind"] != "Kustomization":
                objects[(document["kind"], document["metadata"]["name"])] = document
    return objects


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((DEPLOY / "kubernetes" / "kustomization.yaml").read_text())
    files = {p.name for p in (DEPLOY / "kubernetes").glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files
    assert "configMapGenerator" not in kustomization  # hashed names would restart on edits


def test_deployment_mounts_policies_as_a_directory_with_probes_and_a_volume() -> None:
    objects = k8s_objects()
    deployment = objects[("Deployment", "compliance-gateway")]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert all("subPath" not in m and "subPathExpr" not in m for m in mounts.values())
    assert mounts["policies"]["mountPath"] == "/etc/gateway/policies"
    assert ("ConfigMap", volumes["policies"]["configMap"]["name"]) in objects
    assert mounts["data"]["mountPath"] == "/var/lib/gateway"
    claim = volumes["data"]["persistentVolumeClaim"]["claimName"]
    assert objects[("PersistentVolumeClaim", claim)]["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "admin"}
    assert container["args"] == ["serve", "--grace", str(GRACE)]
    assert pod["terminationGracePeriodSeconds"] > GRACE
    dockerfile = (REPO / "Dockerfile").read_text()
    assert f"USER {pod['securityContext']['runAsUser']}:" in dockerfile
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"submission": 2587, "submissions": 2465, "admin": 9587, "sync": 9588}
    assert all(f"{port}" in dockerfile for port in ports.values())  # EXPOSEd


def test_kubernetes_config_and_policies_load(tmp_path: Path) -> None:
    """The ConfigMaps as the pod sees them, secrets replaced by test files via GATEWAY_…."""
    objects = k8s_objects()
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    gateway_toml = config_dir / "gateway.toml"
    gateway_toml.write_text(objects[("ConfigMap", "gateway-config")]["data"]["gateway.toml"])
    policies = tmp_path / "policies"
    policies.mkdir()
    for name, text in objects[("ConfigMap", "gateway-policies")]["data"].items():
        (policies / name).write_text(text)
    issuer = TestIssuer.generate("k1")
    issuer.write_jwks(tmp_path / "mdm.jwks.json")
    cert = trustme.CA().issue_cert("smtp-gateway.example.com")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "tls.crt"))
    cert.private_key_pem.write_to_path(str(tmp_path / "tls.key"))
    (tmp_path / "password").write_text("secret\n")
    settings = load_settings(
        gateway_toml,
        {
            "GATEWAY_GATEWAY__POLICY_DIR": str(policies),
            "GATEWAY_TOKENS__ISSUERS__0__KEYS": f'["{tmp_path / "mdm.jwks.json"}"]',
            "GATEWAY_SMTP__TLS_CERT": str(tmp_path / "tls.crt"),
            "GATEWAY_SMTP__TLS_KEY": str(tmp_path / "tls.key"),
            "GATEWAY_UPSTREAM__SMARTHOSTS__0__PASSWORD_FILE": str(tmp_path / "password"),
            "GATEWAY_SYNC__CLIENT_SECRET_FILE": str(tmp_path / "password"),
            "GATEWAY_SYNC__DOVEADM_API_KEY_FILE": str(tmp_path / "password"),
        },
    )
    assert settings.upstream.smarthosts[0].password == "secret"
    assert settings.sync.enabled
    assert settings.sync.client_secret == "secret"
    assert settings.sync.doveadm_api_key == "secret"
    assert settings.smtp.listen.port == 2587
    assert settings.admin_listen is not None
    assert settings.admin_listen.port == 9587
    store = PolicyStore(policies, settings.groups)
    result = store.reload(trigger="test")
    assert result.ok
    assert [p.id for p in store.current.source.policies] == ["remove-tiktok"]


def test_the_sync_listener_is_served_mounted_and_reachable_inside_the_cluster() -> None:
    """[sync] listens on the container port the sync Service targets; its secret files
    are in the mounted gateway-sync secret; the Service stays inside the cluster."""
    objects = k8s_objects()
    config = tomllib.loads(objects[("ConfigMap", "gateway-config")]["data"]["gateway.toml"])
    sync = config["sync"]
    pod = objects[("Deployment", "compliance-gateway")]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert sync["enabled"] is True
    assert sync["listen"] == f"0.0.0.0:{ports['sync']}"
    service = objects[("Service", "compliance-gateway-sync")]
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["selector"] == {"app.kubernetes.io/name": "compliance-gateway"}
    assert service["spec"]["ports"] == [{"name": "sync", "port": 9588, "targetPort": "sync"}]
    # Off loopback, the listener needs Dovecot's credentials (checked at load, too).
    assert sync["client_id"] == "dovecot"
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["sync-secret"]["secret"]["secretName"] == "gateway-sync"
    for key in ("client_secret_file", "doveadm_api_key_file"):
        assert Path(sync[key]).parent == Path(mounts["sync-secret"])
    # The public Service does not expose it.
    public = objects[("Service", "compliance-gateway")]
    assert all(p["targetPort"] != "sync" for p in public["spec"]["ports"])


def test_compose_mounts_and_environment_give_valid_settings(tmp_path: Path) -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    service = compose["services"]["gateway"]
    (config_volume,) = [v for v in service["volumes"] if v.endswith(":/etc/gateway:ro")]
    # No default: the repository's demo config (development key, plaintext AUTH) is never
    # what compose starts with; compose refuses to start without GATEWAY_CONFIG_DIR.
    assert config_volume.startswith("${GATEWAY_CONFIG_DIR:?")
    assert "gateway-data:/var/lib/gateway" in service["volumes"]
    assert service["command"] == ["serve", "--grace", str(GRACE)]
    assert int(service["stop_grace_period"].rstrip("s")) > GRACE
    environ = {
        name: re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)  # compose's ${VAR:-default}
        for name, value in service["environment"].items()
    }
    # The shipped starting point for a container's configuration directory loads there...
    config = container_config_dir(tmp_path / "mine")
    settings = load_settings(config, environ)
    assert str(settings.smtp.listen) == "0.0.0.0:2587"  # inside the container
    assert settings.smtp.tls_enabled
    assert not settings.smtp.allow_plaintext_auth
    assert settings.hold.database == Path("/var/lib/gateway/hold.db")
    assert settings.upstream.smarthosts[0].host == "host.docker.internal"
    # ...and the demo config, mounted by mistake, is refused with the setting named.
    shutil.copytree(REPO / "config", tmp_path / "config")
    with pytest.raises(SettingsError) as caught:
        load_settings(tmp_path / "config" / "gateway.toml", environ)
    (problem,) = caught.value.problems
    assert "smtp.allow_plaintext_auth: AUTH without TLS on 0.0.0.0:2587" in str(problem)
    assert str(problem).startswith(str(tmp_path / "config" / "gateway.toml"))


def container_config_dir(directory: Path) -> Path:
    """deploy/docker/gateway.toml with the files it expects next to it (test stand-ins)."""
    directory.mkdir(parents=True)
    shutil.copy(DEPLOY / "docker" / "gateway.toml", directory / "gateway.toml")
    (directory / "policies").mkdir()
    shutil.copy(REPO / "config" / "policies" / "remove-tiktok.toml", directory / "policies")
    (directory / "keys").mkdir()
    TestIssuer.generate("k1").write_jwks(directory / "keys" / "mdm.jwks.json")
    (directory / "tls").mkdir()
    cert = trustme.CA().issue_cert("smtp-gateway.example.com", "127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(str(directory / "tls" / "cert.pem"))
    cert.private_key_pem.write_to_path(str(directory / "tls" / "key.pem"))
    return directory / "gateway.toml"


def test_the_image_reference_is_one_a_cluster_can_pull() -> None:
    """kustomize's images: names a registry and a version (never :latest); the rendered
    Deployment carries it (kubectl kustomize, when kubectl is installed)."""
    kustomization = yaml.safe_load((DEPLOY / "kubernetes" / "kustomization.yaml").read_text())
    (container,) = k8s_objects()[("Deployment", "compliance-gateway")]["spec"]["template"]["spec"][
        "containers"
    ]
    (image,) = [i for i in kustomization["images"] if i["name"] == container["image"]]
    registry = image["newName"].split("/", 1)[0]
    assert "." in registry or ":" in registry, "a registry host, not a bare local name"
    assert image.get("newTag") not in (None, "", "latest") or image.get("digest")
    expected = f"{image['newName']}:{image['newTag']}"
    if shutil.which("kubectl"):
        rendered = subprocess.run(
            ["kubectl", "kustomize", str(DEPLOY / "kubernetes")],
            capture_output=True, text=True, timeout=60, check=True,
        ).stdout  # fmt: skip
        deployment = next(
            d for d in yaml.safe_load_all(rendered) if d and d["kind"] == "Deployment"
        )
        assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == expected
    operations = (REPO / "docs" / "operations.md").read_text()
    assert "kustomize edit set image" in operations


def test_a_network_policy_keeps_the_admin_and_sync_ports_inside() -> None:
    """Phones reach the submission ports from anywhere; /metrics and /status only from
    the monitoring namespace; the sync endpoint only from the mail namespace."""
    objects = k8s_objects()
    policy = objects[("NetworkPolicy", "compliance-gateway")]
    pod = objects[("Deployment", "compliance-gateway")]["spec"]["template"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    ports = {p["name"]: p["containerPort"] for p in pod["spec"]["containers"][0]["ports"]}
    allowed: dict[int, list[Any]] = {}
    for rule in policy["spec"]["ingress"]:
        for port in rule["ports"]:
            allowed.setdefault(port["port"], []).append(rule.get("from"))
    assert set(allowed) == set(ports.values())  # every port is named: nothing else is open
    assert allowed[ports["submission"]] == [None]
    assert allowed[ports["submissions"]] == [None]

    def namespaces(port: int) -> list[str]:
        (sources,) = allowed[port]
        return [
            s["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"] for s in sources
        ]

    assert namespaces(ports["admin"]) == ["monitoring"]
    assert namespaces(ports["sync"]) == ["mail"]
    sync_url = yaml.safe_load((DEPLOY / "kubernetes" / "config.yaml").read_text())["data"][
        "gateway.toml"
    ]
    assert tomllib.loads(sync_url)["sync"]["doveadm_url"].startswith("http://dovecot.mail.svc")


@pytest.fixture(scope="module")
def issuer() -> TestIssuer:
    return TestIssuer.generate("k1")


async def test_every_metric_an_alert_uses_is_exported(tmp_path: Path, issuer: TestIssuer) -> None:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    expressions = [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    used = {name for expr in expressions for name in re.findall(r"\bgateway_[a-z_]+", expr)}
    assert len(used) >= 8
    async with gateway_with_upstream(tmp_path, issuer) as (gw, _):
        await FakeDevice(issuer).send(gw.port)
        await FakeDevice(TestIssuer.generate("k1")).send(gw.port)  # a token failure
        exported = gw.server.services.metrics.render().decode()
    # A labelled family with no event yet is declared by its HELP line only.
    exported_names = set(re.findall(r"^(?:# HELP )?(gateway_[a-z_]+)", exported, re.MULTILINE))
    assert "gateway_token_failures_total{" in exported
    assert used <= exported_names, used - exported_names
