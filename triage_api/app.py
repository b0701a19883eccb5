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
from typing import Annotated, Any

from fastapi import FastAPI, File, Query, UploadFile
from fastapi.responses import JSONResponse
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from audit.checkpoint import Checkpointer
from audit.log import EventCode, record
from triage_api import (
    appeal_views,
    audit_views,
    auth,
    cases,
    health_views,
    imaging_views,
    ingest,
    live,
    monitoring,
    monitoring_views,
    outbox,
    passwords,
    reading,
    reading_views,
    webhooks,
)
from triage_api.api import live as live_routes
from triage_api.api import webhooks as webhook_routes
from triage_api.auth import Role
from triage_api.blobs import write_atomically
from triage_api.db import make_engine, make_sessionmaker, migrate, transaction
from triage_api.deps import Admin, Reader, Runtime, RuntimeDep, Uploader
from triage_api.errors import Conflict, NotFound, error_body, install_handlers
from triage_api.ratelimit import ClinicRateLimiter
from triage_api.schemas import (
    CaseRead,
    KeyRevoked,
    StudyCreated,
    UserCreate,
    UserCreated,
    WorklistItem,
    case_read,
    worklist_item,
)
from triage_api.settings import Settings
from triage_api.tables import User
from triage_api.vocab import CaseStatus, Tier
from triage_api.web import views as web_views
from triage_api.worker import Worker, load_model

log = logging.getLogger("triage")

MULTIPART_OVERHEAD = 64 * 1024


class BodyLimit:
    """Answer 413 for bodies over ``limit`` bytes: at once if Content-Length says so, and
    while streaming if the client lies or sends chunks."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            response = JSONResponse(
                error_body("body_too_large", f"request body over {self.limit} bytes"), status_code=413
            )
            await response(scope, receive, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise StarletteHTTPException(413, f"request body over {self.limit} bytes")
            return message

        await self.app(scope, limited, send)


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
        settings.data_dir.mkdir(parents=True, exist_ok=True)
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
            print(f"Created the first admin. Its API key, shown once:\n{key}", flush=True)
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
        try:
            yield
        finally:
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
    app.add_middleware(BodyLimit, limit=settings.max_upload_bytes + MULTIPART_OVERHEAD)
    _routes(app)
    app.include_router(reading_views.router)
    app.include_router(appeal_views.router)
    app.include_router(monitoring_views.router)
    app.include_router(health_views.router)
    app.include_router(audit_views.router)
    app.include_router(imaging_views.router)
    app.include_router(webhook_routes.router)
    app.include_router(live_routes.router)
    web_views.install(app)
    return app


def _routes(app: FastAPI) -> None:
    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post(
        "/v1/studies",
        response_model=StudyCreated,
        status_code=201,
        responses={200: {"model": StudyCreated, "description": "The same bytes were uploaded before"}},
    )
    def upload_study(runtime: RuntimeDep, principal: Uploader, file: Annotated[UploadFile, File()]) -> Any:
        """Upload one study (DICOM Part 10, PNG or JPEG) for scoring."""
        for clinic_id in principal.clinic_ids:
            runtime.limiter.take(clinic_id)
        limit = runtime.settings.max_upload_bytes
        data = file.file.read(limit + 1)
        if len(data) > limit:
            raise StarletteHTTPException(413, f"file over {limit} bytes")
        case, created = ingest.accept_study(
            runtime.factory,
            reads=runtime.reads,
            principal=principal,
            data=data,
            settings=runtime.settings,
            pseudonym_key=runtime.pseudonym_key,
        )
        body = StudyCreated(
            id=case.id,
            status=case.status,
            sha256=case.sha256,
            received_at=case.received_at,
            deadline=case.deadline,
        )
        return JSONResponse(body.model_dump(mode="json"), status_code=201 if created else 200)

    @app.get("/v1/studies/{case_id}", response_model=CaseRead)
    def get_study(runtime: RuntimeDep, principal: Reader, case_id: str) -> CaseRead:
        """One case with its current prediction."""
        with transaction(runtime.factory) as session:
            case, prediction = cases.read_case(session, principal=principal, case_id=case_id)
            return case_read(case, prediction, reading.primary_read(session, case.id))

    @app.get("/v1/worklist", response_model=list[WorklistItem])
    def get_worklist(
        runtime: RuntimeDep,
        principal: Reader,
        status: CaseStatus | None = None,
        tier: Tier | None = None,
        unread: bool | None = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 100,
        offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
    ) -> list[WorklistItem]:
        """The caller's cases, earliest reading deadline first."""
        with transaction(runtime.factory) as session:
            rows = cases.worklist(
                session,
                principal=principal,
                status=status,
                tier=tier,
                unread=unread,
                limit=limit,
                offset=offset,
            )
            return [worklist_item(case) for case in rows]

    @app.post("/v1/users", response_model=UserCreated, status_code=201)
    def create_user(runtime: RuntimeDep, principal: Admin, body: UserCreate) -> UserCreated:
        """Create a user (and clinics it names) with a first API key, shown once."""
        try:
            with transaction(runtime.factory) as session:
                user, key = auth.add_user(session, name=body.name, role=body.role, clinics=body.clinics)
                if body.password is not None:
                    passwords.set_password(session, user, body.password)
                record(
                    session,
                    actor=principal.actor,
                    action="user.create",
                    code=EventCode.SECURITY_ALERT,
                    object_type="user",
                    object_id=str(user.id),
                    details={
                        "role": body.role.value,
                        "clinics": body.clinics,
                        "password": body.password is not None,
                    },
                )
                return UserCreated(
                    id=user.id, name=user.name, role=body.role, clinics=body.clinics, api_key=key
                )
        except IntegrityError:
            raise Conflict("a user with that name exists") from None

    @app.delete("/v1/keys/{prefix}", response_model=KeyRevoked)
    def revoke_key(runtime: RuntimeDep, principal: Admin, prefix: str) -> KeyRevoked:
        """Revoke an API key by its public prefix."""
        with transaction(runtime.factory) as session:
            key = auth.revoke_key(session, prefix)
            if key is None or key.revoked_at is None:
                raise NotFound("no such key")
            record(
                session,
                actor=principal.actor,
                action="key.revoke",
                code=EventCode.SECURITY_ALERT,
                object_type="api_key",
                object_id=prefix,
            )
            return KeyRevoked(prefix=prefix, revoked_at=key.revoked_at)
