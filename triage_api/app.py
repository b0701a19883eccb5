"""The FastAPI application: ``create_app(settings)`` builds everything in its lifespan."""

from __future__ import annotations

import contextlib
import logging
import secrets
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path

import anyio
from fastapi import FastAPI
from fastapi.responses import JSONResponse, RedirectResponse, Response
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request, cookie_parser
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from audit.checkpoint import ChainBroken, Checkpointer
from audit.log import EventCode, record
from triage_api import api, auth, ingest, live, monitoring, outbox, webhooks
from triage_api.auth import Role
from triage_api.blobs import make_private, write_atomically
from triage_api.db import make_engine, make_sessionmaker, migrate, transaction
from triage_api.deps import Runtime
from triage_api.dicom import sr
from triage_api.dicom.listener import StorageListener
from triage_api.errors import TriageError, error_body, install_handlers
from triage_api.ratelimit import ClinicRateLimiter
from triage_api.settings import Settings
from triage_api.tables import User
from triage_api.web import sessions
from triage_api.web import views as web_views
from triage_api.worker import Worker, load_model

log = logging.getLogger("triage")

FIRST_ADMIN_KEY = "first-admin.key"
"""Where the bootstrap admin's key is written (in ``secret_dir``), never to stdout: a
journal keeps stdout for anyone in the ``systemd-journal`` group."""
MULTIPART_OVERHEAD = 64 * 1024
UPLOAD_PATHS = frozenset({"/v1/studies", "/dicom-web/studies", "/web/clinic/upload"})
"""Routes that take a study's bytes (the clinic page's sends one raw, checked for its CSRF
token before a byte is read); every other body is capped at ``max_json_bytes``."""
OPEN_PATHS = frozenset({"/login"})
"""The only route that takes a body from a caller who has no credential yet."""
BODILESS = frozenset({"GET", "HEAD", "OPTIONS"})


def _refuse(status: int, code: str, message: str) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(error_body(code, message), status_code=status, headers=headers)


def _credential_valid(runtime: Runtime, scope: Scope) -> bool:
    """Whether the request carries a live API key or web session (one indexed lookup)."""
    headers = dict(scope["headers"])
    authorization = headers.get(b"authorization", b"").decode("latin-1")
    with runtime.reads() as session:
        if authorization.startswith("Bearer "):
            try:
                auth.authenticate(session, authorization.removeprefix("Bearer ").strip())
            except TriageError:
                return False
            return True
        token = cookie_parser(headers.get(b"cookie", b"").decode("latin-1")).get(web_views.COOKIE)
        user, _ = sessions.peek(session, token=token, settings=runtime.settings)
        return user is not None


class BodyGate:
    """Before a byte of a request body is read: the caller must hold a credential, and the
    body must fit its route's cap (413 at once if Content-Length says so, and while
    streaming if the client lies or sends chunks).

    FastAPI reads and parses a body before it runs the route's dependencies, so without
    this gate an anonymous client could make the service buffer and parse (on the event
    loop) a body of any size. The credential is checked again, with its role, by the
    route's own dependency; here it only decides whether the body is read at all.
    """

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.upload_limit = settings.max_upload_bytes + MULTIPART_OVERHEAD
        self.limit = settings.max_json_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in BODILESS:
            await self.app(scope, receive, send)
            return
        limit = self.upload_limit if scope["path"] in UPLOAD_PATHS else self.limit
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            await _refuse(413, "body_too_large", f"request body over {limit} bytes")(scope, receive, send)
            return
        runtime: Runtime | None = getattr(scope["app"].state, "runtime", None)
        if scope["path"] not in OPEN_PATHS and (
            runtime is None or not await anyio.to_thread.run_sync(_credential_valid, runtime, scope)
        ):
            refusal: Response = _refuse(401, "not_authenticated", "sign in or send a valid API key first")
            if not scope["path"].startswith(("/v1/", "/dicom-web/")) and b"x-csrf-token" not in dict(
                scope["headers"]
            ):
                refusal = RedirectResponse(
                    web_views.login_url(Request(scope)), status_code=303
                )  # a form post
            await refusal(scope, receive, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                raise StarletteHTTPException(413, f"request body over {limit} bytes")
            return message

        await self.app(scope, limited, send)


PAGE_POLICY = "; ".join(
    (
        "default-src 'self'",
        "img-src 'self' data:",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    )
)
"""The pages load scripts, styles and images from this origin only (no inline code), and
no other site may frame them."""
SECURITY_HEADERS = (
    (b"content-security-policy", PAGE_POLICY.encode()),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),  # login returns to a form's page; nothing leaves
)
PUBLIC_PREFIXES = ("/static/",)
"""Paths that never carry patient data; every other response may, and is never stored."""


class SecurityHeaders:
    """Set the browser-protection headers on every response, and ``Cache-Control:
    no-store`` on every response that may carry patient data (replacing a route's own)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        private = not scope["path"].startswith(PUBLIC_PREFIXES)

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                names = {name for name, _ in SECURITY_HEADERS}
                if private:
                    names.add(b"cache-control")
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() not in names]
                headers += SECURITY_HEADERS
                if private:
                    headers.append((b"cache-control", b"no-store"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, with_headers)


KEY_PARAMETERS = (b"trg_", b"api_key=", b"apikey=", b"access_token=", b"token=", b"key=")


class NoKeysInUrls:
    """Refuse (400) a request whose query string carries an API key, and blank the query
    string first: the server's access log prints the scope's URL, and a key must never
    reach a log (a refused one still works until it is revoked)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        query = scope.get("query_string", b"").lower() if scope["type"] == "http" else b""
        if any(marker in query for marker in KEY_PARAMETERS):
            scope["query_string"] = b""  # in place: uvicorn logs this very dict
            await _refuse(
                400, "key_in_url", "send the API key in the Authorization header, never in the URL"
            )(scope, receive, send)
            return
        await self.app(scope, receive, send)


def read_or_create_secret(path: Path, size: int = 32) -> bytes:
    """A site secret kept outside the database, created once with mode 0600."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not path.exists():
        with contextlib.suppress(FileExistsError):  # another process created it first: use theirs
            write_atomically(path, secrets.token_bytes(size), exclusive=True, mode=0o600)
    return path.read_bytes()


def bootstrap_admin(factory: sessionmaker[Session]) -> str | None:
    """On an empty database, create the first admin and return its key (printed once)."""
    try:
        with transaction(factory) as session:
            if session.execute(select(func.count()).select_from(User)).scalar_one():
                return None
            user, key = auth.add_user(session, name="admin", role=Role.ADMIN, clinics=[])
            record(
                session,
                actor="system",
                action="user.create",
                code=EventCode.SECURITY_ALERT,
                object_type="user",
                object_id=str(user.id),
                details={"role": "admin", "bootstrap": True},
            )
            return key
    except IntegrityError:  # another process bootstrapped at the same moment
        return None


def _audit_files_apart(settings: Settings) -> None:
    """Refuse to start with the audit signing key or checkpoint copy inside the data
    directory, unless ``audit_key_in_data_dir`` allows it.

    Raises:
        RuntimeError: one of them is inside ``data_dir``.
    """
    data = settings.data_dir.resolve()
    for name, path in (("audit key", settings.audit_key_path), ("checkpoint copy", settings.audit_copy_path)):
        if path.resolve().is_relative_to(data) and not settings.audit_key_in_data_dir:
            raise RuntimeError(
                f"the {name} is inside the data directory: set TRIAGE_AUDIT_KEY_FILE / "
                "TRIAGE_AUDIT_CHECKPOINT_COPY elsewhere, or TRIAGE_AUDIT_KEY_IN_DATA_DIR=1 (tests only)"
            )


def _periodic(
    stop: threading.Event, interval: float, name: str, task: Callable[[], None]
) -> threading.Thread:
    """A daemon thread running ``task`` every ``interval`` seconds until ``stop`` is set."""

    def loop() -> None:
        while not stop.wait(interval):
            try:
                task()
            except Exception as exc:  # a failed round is retried at the next interval
                log.error("%s failed (%s)", name, type(exc).__name__)

    return threading.Thread(target=loop, name=name, daemon=True)


def _monitor(factory: sessionmaker[Session], settings: Settings) -> None:
    with transaction(factory) as session:
        monitoring.check_alerts(session, settings=settings)


def outbox_senders(settings: Settings, factory: sessionmaker[Session]) -> dict[str, outbox.Sender]:
    """The sender of each outbox kind this site delivers (DICOM SR, webhooks)."""
    senders: dict[str, outbox.Sender] = {
        sr.KIND: sr.sender(settings),
        webhooks.KIND: webhooks.Sender(
            factory,
            site_secret=read_or_create_secret(settings.secret_dir / "pseudonym.key"),
            timeout=settings.webhook_timeout_seconds,
            clock=lambda: datetime.now(UTC),
        ),
    }
    return senders


def _sweep(factory: sessionmaker[Session], settings: Settings) -> None:
    with transaction(factory) as session:
        webhooks.sweep(session, settings=settings, now=datetime.now(UTC))


def _deliver(factory: sessionmaker[Session], senders: dict[str, outbox.Sender]) -> None:
    outbox.deliver_due(factory, senders, now=lambda: datetime.now(UTC))


def create_app(settings: Settings) -> FastAPI:
    """Build the app. Nothing touches disk, database or model until the lifespan starts."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        ingest.quiet_pydicom()
        _audit_files_apart(settings)  # before anything opens: a refused start leaks nothing
        make_private(settings.data_dir)
        engine = make_engine(settings.sqlalchemy_url)
        migrate(engine)
        factory = make_sessionmaker(engine)
        read_engine = (
            make_engine(settings.sqlalchemy_url, read_only=True)
            if engine.dialect.name == "sqlite"
            else engine
        )
        key = bootstrap_admin(factory)
        if key is not None:
            path = settings.secret_dir / FIRST_ADMIN_KEY
            settings.secret_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            write_atomically(path, f"{key}\n".encode(), mode=0o600)
            print(f"Created the first admin. Its API key is in {path} (mode 0600).", flush=True)
        app.state.runtime = Runtime(
            settings,
            engine,
            factory,
            make_sessionmaker(read_engine),
            read_engine,
            read_or_create_secret(settings.secret_dir / "pseudonym.key"),
            ClinicRateLimiter(settings.uploads_per_minute, settings.upload_burst),
        )
        checkpointer = Checkpointer(
            factory,
            key_path=settings.audit_key_path,
            every_events=settings.audit_checkpoint_events,
            every_seconds=settings.audit_checkpoint_seconds,
            reads=make_sessionmaker(read_engine),
            copy_path=settings.audit_copy_path,
        )
        _ = checkpointer.key  # an unusable key fails the start, not the first checkpoint
        try:
            checkpointer.run_once(force=True)  # sign the last run's final events at once
        except ChainBroken as exc:  # the service still starts; verify names the break
            log.error("audit chain broken, not signing: %s", exc.reason)
        stop = threading.Event()
        senders = outbox_senders(settings, factory)
        app.state.live_feed = feed = live.Feed()
        threads = [
            threading.Thread(target=feed.listen, args=(factory, stop), name="triage-live", daemon=True),
            _periodic(
                stop, settings.monitor_interval_seconds, "triage-monitor", lambda: _monitor(factory, settings)
            ),
            threading.Thread(
                target=checkpointer.run, args=(stop,), name="triage-audit-checkpoint", daemon=True
            ),
            _periodic(
                stop,
                settings.outbox_poll_seconds,
                "triage-outbox",
                lambda: _deliver(factory, senders),
            ),
            _periodic(
                stop,
                settings.webhook_sweep_seconds,
                "triage-webhook-sweep",
                lambda: _sweep(factory, settings),
            ),
        ]
        if settings.run_worker:
            worker = Worker(factory, settings, load_model(settings))
            threads.append(
                threading.Thread(target=worker.run, args=(stop,), name="triage-worker", daemon=True)
            )
        for thread in threads:
            thread.start()
        listener = None
        if settings.dicom_port is not None:
            runtime = app.state.runtime
            listener = StorageListener(
                factory, reads=runtime.reads, settings=settings, pseudonym_key=runtime.pseudonym_key
            )
            listener.start(settings.host, settings.dicom_port)
        try:
            yield
        finally:
            if listener is not None:
                listener.stop()
            stop.set()
            for thread in threads:
                thread.join(timeout=30)
            read_engine.dispose()
            engine.dispose()

    app = FastAPI(
        title="Triage",
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None,  # Swagger UI loads from a CDN; sites are offline
        redoc_url=None,
    )
    install_handlers(app)
    app.add_middleware(BodyGate, settings=settings)
    app.add_middleware(NoKeysInUrls)
    app.add_middleware(SecurityHeaders)  # outermost: it also marks the other refusals
    for router in api.ROUTERS:
        app.include_router(router)
    web_views.install(app)
    return app
