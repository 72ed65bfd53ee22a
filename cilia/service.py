"""The service runner: every cilia service is a FastAPI app on uvicorn, one NATS connection, a
kvstore, and background tasks owned by a TaskGroup.

Common endpoints: `/healthz` (the process runs), `/readyz` (NATS and the kvstore answer),
`/metrics` (Prometheus), OpenAPI at `/docs`. Writes need a bearer token of an allowed role; reads
need any valid token unless `CILIA_ANONYMOUS_READ=true`. NATS and the kvstore may be down at start
or go away later: the service keeps running, reports not ready, and reconnects by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import uvicorn
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from nats.aio.client import Client as NATS
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from cilia import __version__, auth, bus
from cilia.errors import CiliaError, PolicyError, ResourceError
from cilia.kvstore import KVStore
from cilia.kvstore import connect as kv_connect
from cilia.settings import Settings

log = logging.getLogger("cilia.service")

Hook = Callable[["Service"], Awaitable[None]]
Task = Callable[["Service"], Awaitable[None]]


class KeyValueFormatter(logging.Formatter):
    """One line per event: `ts=... level=... logger=... msg`."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line = f"ts={ts}.{int(record.msecs):03d}Z level={record.levelname.lower()} logger={record.name} {record.getMessage()}"
        if record.exc_info:
            line += " exc=" + repr(self.formatException(record.exc_info).splitlines()[-1])
        return line


def setup_logging(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KeyValueFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("uvicorn.access",):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _kv_text(values: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in values.items())


class Service:
    """A cilia service: settings, app, NATS, kvstore, hooks and background tasks."""

    def __init__(
        self, name: str, settings: Settings, description: str = "", write_roles: tuple[str, ...] = ("admin",)
    ) -> None:
        self.name = name
        self.settings = settings
        self.write_roles = write_roles
        self.registry = CollectorRegistry()
        self.up = Gauge("cilia_up", "1 when the service is ready", ["service"], registry=self.registry)
        self.requests = Counter(
            "cilia_http_requests_total",
            "HTTP requests by route and status",
            ["service", "method", "route", "status"],
            registry=self.registry,
        )
        self.nc: NATS | None = None
        self.kv: KVStore | None = None
        self.credentials: auth.Credentials | None = None
        self.started_at = time.time()
        self._start_hooks: list[Hook] = []
        self._stop_hooks: list[Hook] = []
        self._tasks: list[Task] = []
        self.ready_event: asyncio.Event | None = None
        self.app = FastAPI(
            title=f"cilia {name}",
            version=__version__,
            description=description,
            lifespan=self._lifespan,
        )
        self._routes()

    # --- wiring -------------------------------------------------------------------------------

    def on_start(self, hook: Hook) -> Hook:
        """Run `hook(service)` once NATS and the kvstore are connected."""
        self._start_hooks.append(hook)
        return hook

    def on_stop(self, hook: Hook) -> Hook:
        self._stop_hooks.append(hook)
        return hook

    def task(self, fn: Task) -> Task:
        """Run `fn(service)` in the background for the life of the service (restarted if it fails)."""
        self._tasks.append(fn)
        return fn

    # --- auth ---------------------------------------------------------------------------------

    def _role(self, request: Request) -> str | None:
        header = request.headers.get("authorization", "")
        if not header.lower().startswith("bearer "):
            return None
        if self.credentials is None:
            return None
        return self.credentials.role_of(header[7:].strip())

    def require_write(self, *roles: str) -> Callable[[Request], str]:
        """A FastAPI dependency: 401 without a valid token, 403 with a token of another role."""
        allowed = roles or self.write_roles

        def dep(request: Request) -> str:
            if self.credentials is None:
                raise HTTPException(503, detail="no credentials loaded (set CILIA_TOKEN_FILE)")
            role = self._role(request)
            if role is None:
                raise HTTPException(
                    401, detail="a bearer token is required", headers={"WWW-Authenticate": "Bearer"}
                )
            if role not in allowed:
                raise HTTPException(403, detail=f"role {role} may not do this (needs {' or '.join(allowed)})")
            return role

        return dep

    def require_read(self) -> Callable[[Request], str]:
        """A FastAPI dependency for reads: any valid token, or none with CILIA_ANONYMOUS_READ=true."""

        def dep(request: Request) -> str:
            if self.settings.anonymous_read:
                return self._role(request) or "anonymous"
            if self.credentials is None:
                raise HTTPException(503, detail="no credentials loaded (set CILIA_TOKEN_FILE)")
            role = self._role(request)
            if role is None:
                raise HTTPException(
                    401, detail="a bearer token is required", headers={"WWW-Authenticate": "Bearer"}
                )
            return role

        return dep

    # --- routes -------------------------------------------------------------------------------

    def _routes(self) -> None:
        app = self.app

        @app.exception_handler(ResourceError)
        async def _resource_error(_: Request, err: ResourceError) -> JSONResponse:
            return JSONResponse(
                {
                    "error": str(err),
                    "field": err.path,
                    "document": err.document,
                    "errors": [e.line() for e in err.errors],
                },
                status_code=422,
            )

        @app.exception_handler(PolicyError)
        async def _policy_error(_: Request, err: PolicyError) -> JSONResponse:
            return JSONResponse({"error": str(err), "field": err.path}, status_code=422)

        @app.exception_handler(CiliaError)
        async def _cilia_error(_: Request, err: CiliaError) -> JSONResponse:
            return JSONResponse({"error": str(err), "field": None}, status_code=400)

        @app.exception_handler(RequestValidationError)
        async def _request_error(_: Request, err: RequestValidationError) -> JSONResponse:
            first = err.errors()[0] if err.errors() else {}
            loc = [str(x) for x in first.get("loc", ()) if x != "body"]
            msg = str(first.get("msg", "invalid request"))
            if first.get("type") == "model_attributes_type":
                msg = "the request body must be a JSON object (content-type: application/json)"
            return JSONResponse({"error": msg, "field": ".".join(loc) or None}, status_code=422)

        @app.exception_handler(StarletteHTTPException)
        async def _http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
            return JSONResponse(
                {"error": str(err.detail), "field": None}, status_code=err.status_code, headers=err.headers
            )

        @app.middleware("http")
        async def _count(request: Request, call_next: Callable[[Request], Awaitable[Any]]) -> Any:
            response = await call_next(request)
            route = request.scope.get("route")
            path = getattr(route, "path", "unmatched")
            self.requests.labels(self.name, request.method, path, str(response.status_code)).inc()
            return response

        @app.get("/healthz", tags=["health"])
        async def healthz() -> dict[str, Any]:
            """The process is alive."""
            return {"status": "ok", "service": self.name, "version": __version__}

        @app.get("/readyz", tags=["health"])
        async def readyz() -> JSONResponse:
            """Ready only when NATS and the kvstore answer."""
            checks = await self.checks()
            ok = all(v == "ok" for v in checks.values())
            self.up.labels(self.name).set(1 if ok else 0)
            return JSONResponse({"ready": ok, "checks": checks}, status_code=200 if ok else 503)

        @app.get("/metrics", tags=["health"], response_class=PlainTextResponse)
        async def metrics() -> PlainTextResponse:
            """Prometheus metrics."""
            return PlainTextResponse(generate_latest(self.registry).decode(), media_type=CONTENT_TYPE_LATEST)

        @app.get("/v1/status", tags=["health"])
        async def status() -> dict[str, Any]:
            """Service name, version, uptime and readiness checks (what `cilia status` shows)."""
            return {
                "service": self.name,
                "version": __version__,
                "node": self.settings.node,
                "uptime_seconds": round(time.time() - self.started_at, 1),
                "checks": await self.checks(),
            }

    async def checks(self) -> dict[str, str]:
        out = {"nats": "ok" if self.nc is not None and self.nc.is_connected else "not connected"}
        out["started"] = "ok" if self.ready_event is not None and self.ready_event.is_set() else "starting"
        if self.kv is None:
            out["kvstore"] = "not connected"
        else:
            try:
                await asyncio.wait_for(self.kv.list(f"{bus.BUCKET_NODES}/"), timeout=1.0)
                out["kvstore"] = "ok"
            except Exception as err:
                out["kvstore"] = f"error: {err}"
        return out

    # --- lifecycle ----------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _lifespan(self, _: FastAPI) -> AsyncIterator[None]:
        log.info(
            "event=starting service=%s version=%s %s",
            self.name,
            __version__,
            _kv_text(self.settings.describe()),
        )
        if self.settings.token_file is not None:
            self.credentials = auth.load(self.settings.token_file)
        self.ready_event = asyncio.Event()
        runner = asyncio.create_task(self._run(), name=f"{self.name}-run")
        try:
            yield
        finally:
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner
            for hook in self._stop_hooks:
                with contextlib.suppress(Exception):
                    await hook(self)
            if self.kv is not None:
                with contextlib.suppress(Exception):
                    await self.kv.close()
            if self.nc is not None:
                with contextlib.suppress(Exception):
                    await self.nc.drain()
            log.info("event=stopped service=%s", self.name)

    def _nats_credentials(self) -> tuple[str | None, str | None]:
        s = self.settings
        if s.nats_user:
            return s.nats_user, s.nats_password.get_secret_value() if s.nats_password else None
        if self.credentials is not None and self.settings.role in self.credentials.nats_users:
            return self.credentials.nats_users[self.settings.role]
        return None, None

    async def _connect(self) -> None:
        """Connect to NATS and the kvstore, retrying with backoff until both answer."""
        delay = 0.2
        user, password = self._nats_credentials()
        while self.nc is None:
            try:
                self.nc = await bus.connect(self.settings.nats_url, f"cilia-{self.name}", user, password)
            except Exception as err:
                log.warning(
                    "event=nats-unavailable url=%s error=%r retry_in=%.1fs",
                    self.settings.nats_url,
                    str(err),
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        delay = 0.2
        while self.kv is None:
            try:
                self.kv = await kv_connect(
                    self.settings.kvstore, self.settings.nats_url, nats_user=user, nats_password=password
                )
            except Exception as err:
                log.warning(
                    "event=kvstore-unavailable kvstore=%s error=%r retry_in=%.1fs",
                    self.settings.kvstore,
                    str(err),
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        if self.settings.role == "service":
            # The cluster's buckets exist before any agent (which may only read some) watches them.
            try:
                await self.kv.prepare(bus.BUCKETS)
            except Exception as err:
                log.warning("event=buckets-not-prepared error=%r", str(err))

    async def _run(self) -> None:
        await self._connect()
        for hook in self._start_hooks:
            await hook(self)
        assert self.ready_event is not None
        self.ready_event.set()
        log.info("event=ready service=%s", self.name)
        async with asyncio.TaskGroup() as tg:
            for fn in self._tasks:
                tg.create_task(self._supervise(fn), name=f"{self.name}-{getattr(fn, '__name__', 'task')}")

    async def _supervise(self, fn: Task) -> None:
        delay = 0.5
        while True:
            try:
                await fn(self)
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception(
                    "event=task-failed service=%s task=%s retry_in=%.1fs",
                    self.name,
                    getattr(fn, "__name__", "task"),
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    def run(self) -> None:
        """Serve until SIGTERM or SIGINT, then shut down gracefully."""
        setup_logging(self.settings.log_level)
        host, port = self.settings.http_host_port()
        config = uvicorn.Config(self.app, host=host, port=port, log_level="warning", lifespan="on")
        server = uvicorn.Server(config)

        async def main() -> None:
            # uvicorn turns SIGTERM/SIGINT into a graceful shutdown (lifespan exit) by itself.
            log.info("event=listening service=%s addr=http://%s:%d", self.name, host, port)
            await server.serve()

        asyncio.run(main())


def read_dependency(service: Service) -> Any:
    return Depends(service.require_read())


def write_dependency(service: Service, *roles: str) -> Any:
    return Depends(service.require_write(*roles))
