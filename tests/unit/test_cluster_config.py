"""The local cluster's input checks and settings, without building anything."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from cilia.cluster import ClusterError, ClusterState, LocalCluster, NodeState
from services.datapath.nodes import NodeInfo
from services.datapath.overlay import device_mac


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "Bad_Name"}, "cluster name 'Bad_Name'"),
        ({"name": "waytoolongname"}, "1-8 lower-case"),
        ({"kvstore": "redis"}, "--kvstore 'redis'"),
        ({"nodes": ["a", "a"]}, "unique"),
        ({"nodes": ["UPPER"]}, "node name 'cilia-UPPER'"),
        ({"nodes": 3, "pod_cidrs": "10.0.0.0/25"}, "too small"),
    ],
)
def test_bad_cluster_requests_are_refused_before_anything_is_made(
    tmp_path: Path, kwargs: dict, message: str
) -> None:
    nodes = kwargs.pop("nodes", 1)
    with pytest.raises(ClusterError) as err:
        LocalCluster(tmp_path / "c").up(nodes, **kwargs)
    assert message in str(err.value)
    assert not (tmp_path / "c").exists()


def test_the_state_gives_clients_their_settings(tmp_path: Path) -> None:
    st = ClusterState(
        name="demo",
        state_dir=str(tmp_path),
        underlay="10.250.0.0/24",
        bridge="demo-br",
        gateway="10.250.0.1",
        pod_cidrs="10.200.0.0/16",
        kvstore="etcd",
        nats_url="nats://10.250.0.1:4222",
        kvstore_url="etcd://10.250.0.1:2379",
        urls={"identity": "http://10.250.0.1:1", "policy": "http://10.250.0.1:2"},
        lease_seconds=15,
    )
    st.nodes["demo-node1"] = NodeState(
        "demo-node1", 1, "demo-node1", "10.250.0.11", "10.200.1.0/24", "demo-u1"
    )
    st.save()
    env = ClusterState.load(tmp_path).env()
    assert env["CILIA_DATAPATH_URL"] == "http://10.250.0.11:9103"
    assert env["CILIA_KVSTORE"] == "etcd://10.250.0.1:2379"
    assert env["CILIA_TOKEN_FILE"] == str(tmp_path / "credentials.yaml")
    assert LocalCluster(tmp_path).node_name(st, "node2") == "demo-node2"
    assert LocalCluster(tmp_path).node_name(st, "demo-node2") == "demo-node2"


def test_a_missing_cluster_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ClusterError, match="no cluster in"):
        LocalCluster(tmp_path).state()


def test_node_health_follows_the_heartbeat() -> None:
    info = NodeInfo(name="n", ip="10.0.0.1", pod_cidr="10.1.0.0/24", lease_seconds=10)  # type: ignore[arg-type]
    assert info.health() == "ok"
    assert info.health(time.time() + 11) == "unreachable"
    assert info.routing() == ("n", "10.0.0.1", "10.1.0.0/24")


def test_overlay_macs_are_stable_local_and_distinct() -> None:
    a, b = device_mac("cilia-node1"), device_mac("cilia-node2")
    assert a == device_mac("cilia-node1") and a != b
    assert int(a.split(":")[0], 16) & 0x02 and not int(a.split(":")[0], 16) & 0x01
