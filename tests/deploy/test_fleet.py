"""The fleet deploy files (deploy/kubernetes-fleet, the compose postgres profile and
deploy/haproxy) are checked against each other and the code: the overlay renders to a
consistent fleet whose gateway.toml loads, and the balancer's config is valid."""

from __future__ import annotations

import ipaddress
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
from gateway.testing.issuer import TestIssuer
from tests.deploy.test_manifests import container_config_dir

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
FLEET = DEPLOY / "kubernetes-fleet"
APP = {"app.kubernetes.io/name": "compliance-gateway"}
TIMEOUT = 60


def test_the_overlay_lists_its_files_and_every_file_parses() -> None:
    kustomization = yaml.safe_load((FLEET / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"]) | {
        p["path"] for p in kustomization["patches"] if "path" in p
    }
    assert listed == {"../kubernetes"} | {
        p.name for p in FLEET.glob("*.yaml") if p.name != "kustomization.yaml"
    }
    assert "configMapGenerator" not in kustomization  # hashed names would restart on edits
    for path in FLEET.rglob("*.yaml"):
        assert all(document for document in yaml.safe_load_all(path.read_text())), path


@pytest.fixture(scope="module")
def fleet() -> dict[tuple[str, str], dict[str, Any]]:
    """The overlay as kubectl would apply it (kubectl's built-in kustomize)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed (it renders the kustomize overlay)")
    rendered = subprocess.run(
        [kubectl, "kustomize", str(FLEET)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=True,
    ).stdout
    return {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(rendered) if d}


def gateway_pod(fleet: dict[tuple[str, str], dict[str, Any]]) -> dict[str, Any]:
    pod: dict[str, Any] = fleet[("Deployment", "compliance-gateway")]["spec"]["template"]
    return pod


def test_the_fleet_rolls_one_at_a_time_spread_across_nodes_under_a_budget(
    fleet: dict[tuple[str, str], dict[str, Any]],
) -> None:
    deployment = fleet[("Deployment", "compliance-gateway")]
    spec = deployment["spec"]
    assert spec["replicas"] == 3
    assert spec["strategy"]["type"] == "RollingUpdate"
    rolling = spec["strategy"]["rollingUpdate"]
    assert rolling["maxSurge"] == 1
    assert rolling["maxUnavailable"] in (0, 1)
    labels = gateway_pod(fleet)["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    pdb = fleet[("PodDisruptionBudget", "compliance-gateway")]
    assert pdb["spec"]["minAvailable"] == 2 < spec["replicas"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["metadata"]["namespace"] == deployment["metadata"]["namespace"]
    pod = gateway_pod(fleet)["spec"]
    spread = {c["topologyKey"]: c for c in pod["topologySpreadConstraints"]}
    nodes = spread["kubernetes.io/hostname"]
    assert nodes["maxSkew"] == 1
    assert nodes["whenUnsatisfiable"] == "DoNotSchedule"
    assert nodes["labelSelector"]["matchLabels"].items() <= labels.items()
    (container,) = pod["containers"]
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    # No per-pod hold volume: the store is shared.
    assert not any(kind == "PersistentVolumeClaim" for kind, _ in fleet)
    assert all("persistentVolumeClaim" not in v for v in pod["volumes"])
    # The phones' addresses reach the gateways.
    public = fleet[("Service", "compliance-gateway")]
    assert public["spec"]["externalTrafficPolicy"] == "Local"
    assert public["spec"]["selector"].items() <= labels.items()


def test_the_store_password_is_mounted_where_gateway_toml_reads_it(
    fleet: dict[tuple[str, str], dict[str, Any]],
) -> None:
    config = tomllib.loads(fleet[("ConfigMap", "gateway-config")]["data"]["gateway.toml"])
    store = config["store"]
    assert store["url"].startswith("postgresql://gateway@gateway-db-rw:5432/")
    assert ":" not in store["url"].split("//")[1].split("@")[0]  # no password in the URL
    pod = gateway_pod(fleet)["spec"]
    (container,) = pod["containers"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    secret = volumes["store-secret"]["secret"]
    assert secret["secretName"] == "gateway-db-app"
    password = Path(store["password_file"])
    assert password.parent == Path(mounts["store-secret"])
    assert {"key": "password", "path": password.name} in secret["items"]
    # The example PostgreSQL serves the same Service name and reads the same Secret.
    example = list(yaml.safe_load_all((FLEET / "postgres-example" / "postgres.yaml").read_text()))
    assert "NOT FOR PRODUCTION" in (FLEET / "postgres-example" / "postgres.yaml").read_text()
    service = next(d for d in example if d["kind"] == "Service")
    statefulset = next(d for d in example if d["kind"] == "StatefulSet")
    assert service["metadata"]["name"] == "gateway-db-rw"
    assert statefulset["spec"]["replicas"] == 1
    env = {e["name"]: e for e in statefulset["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "gateway-db-app",
        "key": "password",
    }
    assert env["POSTGRES_USER"]["value"] == "gateway"


def test_the_fleet_config_loads(
    fleet: dict[tuple[str, str], dict[str, Any]], tmp_path: Path
) -> None:
    """The fleet's gateway.toml as the pod sees it, secrets replaced by test files."""
    gateway_toml = tmp_path / "gateway.toml"
    gateway_toml.write_text(fleet[("ConfigMap", "gateway-config")]["data"]["gateway.toml"])
    policies = tmp_path / "policies"
    policies.mkdir()
    TestIssuer.generate("k1").write_jwks(tmp_path / "mdm.jwks.json")
    cert = trustme.CA().issue_cert("smtp-gateway.example.com")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "tls.crt"))
    cert.private_key_pem.write_to_path(str(tmp_path / "tls.key"))
    (tmp_path / "password").write_text("secret\n")
    (tmp_path / "db-password").write_text("db-secret\n")
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
            "GATEWAY_STORE__PASSWORD_FILE": str(tmp_path / "db-password"),
        },
    )
    assert settings.store.url == "postgresql://gateway@gateway-db-rw:5432/gateway"
    assert settings.store.password == "db-secret"
    assert settings.admin_listen is not None
    assert settings.admin_listen.port == 9587


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    return loaded


def test_the_compose_postgres_profile_runs_two_gateways_on_one_store_behind_haproxy(
    tmp_path: Path,
) -> None:
    services = compose()["services"]
    fleet = {name for name, s in services.items() if "postgres" in s.get("profiles", [])}
    assert fleet == {"postgres", "gateway-1", "gateway-2", "haproxy"}
    assert "profiles" not in services["gateway"]  # the default stays as it was
    assert services["gateway-1"] == services["gateway-2"]
    gateway = services["gateway-1"]
    assert gateway["depends_on"]["postgres"] == {"condition": "service_healthy"}
    # The balancer's fixed address is the one network the gateways take PROXY from.
    balancer = services["haproxy"]["networks"]["fleet"]["ipv4_address"]
    # GATEWAY_CONFIG_DIR is the operator's, started from deploy/docker/gateway.toml.
    config = container_config_dir(tmp_path / "config")
    environ = {
        name: re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)  # compose's ${VAR:-default}
        for name, value in gateway["environment"].items()
    }
    settings = load_settings(config, environ)
    assert settings.store.url == "postgresql://gateway@postgres:5432/gateway"
    assert environ["PGPASSWORD"] == services["postgres"]["environment"]["POSTGRES_PASSWORD"].split(
        ":-"
    )[1].rstrip("}")
    assert settings.smtp.proxy_protocol_from == (ipaddress.ip_network(f"{balancer}/32"),)
    # HAProxy sends to each gateway's listener, by service name, with PROXY v2.
    cfg = (DEPLOY / "haproxy" / "haproxy.cfg").read_text()
    assert services["haproxy"]["volumes"] == [
        "./haproxy/haproxy.cfg:/usr/local/etc/haproxy/haproxy.cfg:ro"
    ]
    servers = re.findall(r"^\s+server (\S+) (\S+):(\d+)", cfg, re.MULTILINE)
    assert {(host, int(port)) for _, host, port in servers} == {
        ("gateway-1", settings.smtp.listen.port),
        ("gateway-2", settings.smtp.listen.port),
    }
    assert re.search(r"default-server send-proxy-v2 check check-send-proxy", cfg)


def haproxy_check(cfg: Path) -> subprocess.CompletedProcess[str]:
    haproxy = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin")
    if haproxy is None:
        pytest.skip("haproxy not installed (apt-get install haproxy)")
    return subprocess.run(
        [haproxy, "-c", "-f", str(cfg)], capture_output=True, text=True, timeout=TIMEOUT
    )


def test_haproxy_accepts_the_compose_balancer_config(tmp_path: Path) -> None:
    """As shipped (the compose hostnames do not resolve here: init-addr none lets it
    start anyway), and with the hostnames resolvable, without a single warning."""
    shipped = haproxy_check(DEPLOY / "haproxy" / "haproxy.cfg")
    assert shipped.returncode == 0, shipped.stderr
    local = tmp_path / "haproxy.cfg"
    text = (DEPLOY / "haproxy" / "haproxy.cfg").read_text()
    local.write_text(re.sub(r" gateway-\d:", " 127.0.0.1:", text))
    checked = haproxy_check(local)
    assert checked.returncode == 0, checked.stderr
    assert "Configuration file is valid" in checked.stdout + checked.stderr
    assert "WARNING" not in checked.stdout + checked.stderr, checked.stderr
