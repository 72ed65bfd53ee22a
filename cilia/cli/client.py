"""How the CLI finds and calls the services: addresses, the token, and HTTP errors as one line.

Addresses, in order: the `--<service>-url` flag, `CILIA_<SERVICE>_URL`, `services.<service>` in
`~/.config/cilia/config.yaml` (or `$CILIA_CONFIG`), the local cluster made by `cilia cluster up`
(in `$CILIA_CLUSTER_DIR` or /var/lib/cilia/cluster), then `http://127.0.0.1:<default port>`. The
token: `--token`, `CILIA_TOKEN`, `token:` in the config file, the `admin` token of the
credentials file named by `CILIA_TOKEN_FILE` (or `tokenFile:` in the config), or the local cluster's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from cilia import auth
from cilia.errors import CiliaError
from cilia.settings import SERVICE_PORTS


class ClientError(CiliaError):
    """A service could not be reached, or answered with an error."""


def config_path() -> Path:
    return Path(os.environ.get("CILIA_CONFIG", Path.home() / ".config" / "cilia" / "config.yaml"))


def _config() -> dict[str, Any]:
    path = config_path()
    if not path.exists():
        return {}
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise ClientError(f"cannot read {path}: {err}") from None
    return doc if isinstance(doc, dict) else {}


def local_cluster_env() -> dict[str, str]:
    """The settings of the local cluster (`cilia cluster up`), if there is one: like kind's kubeconfig."""
    from cilia.cluster import DEFAULT_STATE_DIR, ClusterState

    state_dir = Path(os.environ.get("CILIA_CLUSTER_DIR") or DEFAULT_STATE_DIR)
    if not (state_dir / "cluster.json").exists():
        return {}
    try:
        return ClusterState.load(state_dir).env()
    except (OSError, ValueError, TypeError, CiliaError):
        return {}


@dataclass
class Client:
    """HTTP access to cilia's services for the CLI."""

    urls: dict[str, str] = field(default_factory=dict)
    token: str | None = None
    timeout: float = 10.0

    def url(self, service: str) -> str:
        if self.urls.get(service):
            return self.urls[service].rstrip("/")
        env = os.environ.get(f"CILIA_{service.upper()}_URL")
        if env:
            return env.rstrip("/")
        services = _config().get("services") or {}
        if isinstance(services, dict) and services.get(service):
            return str(services[service]).rstrip("/")
        cluster = local_cluster_env().get(f"CILIA_{service.upper()}_URL")
        if cluster:
            return cluster
        return f"http://127.0.0.1:{SERVICE_PORTS[service]}"

    def bearer(self) -> str | None:
        if self.token:
            return self.token
        if os.environ.get("CILIA_TOKEN"):
            return os.environ["CILIA_TOKEN"]
        cfg = _config()
        if cfg.get("token"):
            return str(cfg["token"])
        token_file = os.environ.get("CILIA_TOKEN_FILE") or cfg.get("tokenFile")
        token_file = token_file or local_cluster_env().get("CILIA_TOKEN_FILE")
        if token_file:
            creds = auth.load(str(token_file))
            return creds.tokens.get("admin")
        return None

    def request(
        self,
        service: str,
        method: str,
        path: str,
        *,
        json: Any = None,
        content: str | bytes | None = None,
        params: dict[str, Any] | None = None,
        content_type: str | None = None,
    ) -> Any:
        """Call a service and return its JSON; errors become one ClientError line."""
        url = self.url(service) + path
        headers = {"accept": "application/json"}
        token = self.bearer()
        if token:
            headers["authorization"] = f"Bearer {token}"
        if content_type:
            headers["content-type"] = content_type
        try:
            resp = httpx.request(
                method, url, json=json, content=content, params=params, headers=headers, timeout=self.timeout
            )
        except httpx.ConnectError:
            raise ClientError(
                f"cannot reach the {service} service at {self.url(service)} (is it running? set CILIA_{service.upper()}_URL)"
            ) from None
        except httpx.TimeoutException:
            raise ClientError(
                f"the {service} service at {self.url(service)} did not answer within {self.timeout}s"
            ) from None
        except httpx.HTTPError as err:
            raise ClientError(f"{service} service: {err}") from None
        try:
            body = resp.json()
        except ValueError:
            body = {"error": resp.text.strip()[:200]}
        if resp.status_code >= 400:
            msg = body.get("error") if isinstance(body, dict) else None
            if resp.status_code == 401 and not token:
                msg = f"{msg or 'unauthorized'} (pass --token, set CILIA_TOKEN or CILIA_TOKEN_FILE)"
            raise ClientError(str(msg or f"HTTP {resp.status_code}"))
        return body
