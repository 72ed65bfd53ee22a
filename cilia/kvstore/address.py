"""Which kvstore to use: the value of `CILIA_KVSTORE` ('nats', 'nats://host:port' or 'etcd://host:port')."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

from cilia.kvstore.errors import KVError

DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
DEFAULT_PORTS = {"nats": 4222, "etcd": 2379}


@dataclass(frozen=True)
class Address:
    """A parsed kvstore address; `url` is what the client connects to, `shown` is safe to print."""

    backend: Literal["nats", "etcd"]
    url: str
    host: str
    port: int

    @property
    def shown(self) -> str:
        """The address without credentials, for logs and error messages."""
        return f"{self.backend}://{self.host}:{self.port}"


def parse_address(kvstore: str, nats_url: str = DEFAULT_NATS_URL) -> Address:
    """`'nats'` -> the NATS server at `nats_url`; otherwise a `nats://` or `etcd://` URL."""
    value = nats_url if kvstore.strip() in ("", "nats") else kvstore.strip()
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError as err:
        raise KVError(
            f"kvstore address {value!r} is not a URL ({err}): use 'nats', 'nats://host:port' or 'etcd://host:port'"
        ) from err
    scheme = parts.scheme
    if scheme not in ("nats", "etcd") or not parts.hostname:
        raise KVError(
            f"kvstore address {value!r} is not understood: "
            "set CILIA_KVSTORE to 'nats' (uses CILIA_NATS_URL), 'nats://host:port' or 'etcd://host:port'"
        )
    if scheme == "etcd" and (parts.username or parts.password):
        raise KVError(
            f"kvstore address {parts.hostname}: etcd user/password authentication is not supported yet"
        )
    backend: Literal["nats", "etcd"] = "nats" if scheme == "nats" else "etcd"
    return Address(backend, value, parts.hostname, port or DEFAULT_PORTS[scheme])
