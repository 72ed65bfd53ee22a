"""e2e fixtures: network namespaces and endpoints made for one test and removed after it, even when it fails.

Namespaces get a unique name `ct-<pid>-<n>` so that parallel runs and leftovers of a crashed run never
collide; endpoint namespaces are named after their node's, so they are unique too.
"""

from __future__ import annotations

import itertools
import os
import subprocess
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address

import pytest

from services.datapath.plumbing import (
    NETNS_DIR,
    EndpointNetwork,
    create_endpoint,
    delete_endpoint,
    endpoint_names,
)

NODE_ADDRESS = IPv4Address("10.99.0.1")  # the test node's own address (on its lo: no dummy devices needed)
COMMAND_TIMEOUT = 30.0

_sequence = itertools.count()

NetnsFactory = Callable[..., str]
EndpointFactory = Callable[..., EndpointNetwork]


def unique_netns_name(prefix: str = "ct") -> str:
    """A namespace name no other test or run uses: `<prefix>-<pid>-<n>`."""
    return f"{prefix}-{os.getpid()}-{next(_sequence)}"


def ip(*argv: str, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run `ip [-n netns] argv...` and return its output; fail the test with its stderr if it fails."""
    cmd = ["ip", *(["-n", netns] if netns else []), *argv]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False)
    if check and done.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} failed: {done.stderr.strip()}")
    return done


def netns_exists(name: str) -> bool:
    """Whether `ip netns` has a namespace of this name."""
    return (NETNS_DIR / name).exists()


@pytest.fixture
def make_netns() -> Iterator[NetnsFactory]:
    """A factory of fresh network namespaces (lo up); all are deleted at teardown."""
    made: list[str] = []

    def make(prefix: str = "ct") -> str:
        name = unique_netns_name(prefix)
        ip("netns", "add", name)
        made.append(name)
        ip("link", "set", "lo", "up", netns=name)
        return name

    yield make
    for name in reversed(made):
        if netns_exists(name):
            ip("netns", "delete", name, check=False)


@pytest.fixture
def netns(make_netns: NetnsFactory) -> str:
    """One fresh network namespace, deleted at teardown."""
    return make_netns()


@pytest.fixture
def node_address() -> IPv4Address:
    """The address the `node_netns` fixture's node has."""
    return NODE_ADDRESS


@pytest.fixture
def node_netns(make_netns: NetnsFactory, node_address: IPv4Address) -> str:
    """A fresh namespace acting as a node: lo up with the node's address `node_address`/32."""
    name = make_netns("ct")
    ip("addr", "add", f"{node_address}/32", "dev", "lo", netns=name)
    return name


@pytest.fixture
def make_endpoint(node_netns: str) -> Iterator[EndpointFactory]:
    """A factory of endpoints plumbed on `node_netns` (`make_endpoint("default", "a", "10.0.1.2")`).

    At teardown each is deleted, and its namespace removed even if creating it failed half-way.
    """
    records: list[EndpointNetwork] = []
    managed: list[str] = []

    def make(
        namespace: str, name: str, address: IPv4Address | str, *, netns_path: str | None = None
    ) -> EndpointNetwork:
        if netns_path is None:
            managed.append(endpoint_names(namespace, name, node_netns).netns)
        record = create_endpoint(namespace, name, address, node_netns=node_netns, netns_path=netns_path)
        records.append(record)
        return record

    yield make
    for record in reversed(records):
        try:
            delete_endpoint(record)
        except Exception as err:  # go on: the namespaces are removed below all the same
            print(f"teardown: delete_endpoint({record.endpoint}) failed: {err!r}")
    for name in managed:
        if netns_exists(name):
            ip("netns", "delete", name, check=False)
