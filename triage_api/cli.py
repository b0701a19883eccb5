"""The ``triage`` command: serve, worker, users, migrate (and the model commands)."""

from __future__ import annotations

import argparse
import getpass
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from audit.log import EventCode, record
from models import cli as models_cli
from triage_api import audit_cli, auth, users
from triage_api.db import make_engine, make_sessionmaker, migrate, transaction
from triage_api.errors import NotPermitted, TriageError
from triage_api.ingest import quiet_pydicom
from triage_api.settings import Settings


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from triage_api.app import create_app

    run_worker = None if args.workers is None else args.workers > 0
    overrides = {"host": args.host, "port": args.port, "run_worker": run_worker}
    settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info")
    return 0


def _worker(args: argparse.Namespace) -> int:
    from triage_api.worker import Worker, load_model

    quiet_pydicom()
    overrides = {"device": args.device, "batch_size": args.batch, "decode_workers": args.decode_workers}
    settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    engine = make_engine(settings.sqlalchemy_url)
    migrate(engine)
    worker = Worker(make_sessionmaker(engine), settings, load_model(settings))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    worker.run(stop)
    engine.dispose()
    return 0


def _migrate(_args: argparse.Namespace) -> int:
    settings = Settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    migrate(make_engine(settings.sqlalchemy_url))
    return 0


def _new_password() -> str:
    """From ``TRIAGE_NEW_PASSWORD`` (scripts), else asked twice without echo."""
    from_env = os.environ.get("TRIAGE_NEW_PASSWORD")
    if from_env:
        return from_env
    first = getpass.getpass("Password for the web login: ")
    if getpass.getpass("Repeat it: ") != first:
        raise NotPermitted("the passwords differ")
    return first


def _users_add(args: argparse.Namespace) -> int:
    from triage_api.errors import InvalidRequest
    from triage_api.passwords import hash_password

    settings = Settings()
    try:
        password_hash = hash_password(_new_password()) if args.password else None
    except InvalidRequest as exc:
        raise NotPermitted(exc.message) from None
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.sqlalchemy_url)
    migrate(engine)
    with transaction(make_sessionmaker(engine)) as session:
        user, key = auth.add_user(session, name=args.name, role=auth.Role(args.role), clinics=args.clinic)
        user.password_hash = password_hash
        record(
            session,
            actor="cli",
            action="user.create",
            code=EventCode.SECURITY_ALERT,
            object_type="user",
            object_id=str(user.id),
            details={"role": args.role, "clinics": args.clinic, "password": password_hash is not None},
        )
    print(key)
    return 0


def _users_revoke(args: argparse.Namespace) -> int:
    settings = Settings()
    engine = make_engine(settings.sqlalchemy_url)
    with transaction(make_sessionmaker(engine)) as session:
        key = auth.revoke_key(session, args.prefix)
        if key is None:
            print(f"no key with prefix {args.prefix}", file=sys.stderr)
            return 1
        record(
            session,
            actor="cli",
            action="key.revoke",
            code=EventCode.SECURITY_ALERT,
            object_type="api_key",
            object_id=args.prefix,
        )
        users.end_sessions(session, actor="cli", key=key)
    return 0


def _users_disable(args: argparse.Namespace) -> int:
    settings = Settings()
    engine = make_engine(settings.sqlalchemy_url)
    with transaction(make_sessionmaker(engine)) as session:
        _, ended = users.set_disabled(session, actor="cli", name=args.name, disabled=args.disabled)
    print(f"{args.name} {'disabled' if args.disabled else 'enabled'}; web sessions ended: {ended}")
    return 0


def _users_set_password(args: argparse.Namespace) -> int:
    from triage_api.errors import InvalidRequest

    settings = Settings()
    engine = make_engine(settings.sqlalchemy_url)
    try:
        with transaction(make_sessionmaker(engine)) as session:
            users.set_password(session, actor="cli", name=args.name, password=_new_password())
    except InvalidRequest as exc:
        raise NotPermitted(exc.message) from None
    print(f"password set for {args.name}; their web sessions ended")
    return 0


def _export_reads(args: argparse.Namespace) -> int:
    from sqlalchemy import select

    from triage_api.export import export_reads
    from triage_api.tables import Clinic

    settings = Settings()
    engine = make_engine(settings.sqlalchemy_url)
    migrate(engine)
    with transaction(make_sessionmaker(engine)) as session:
        clinic_ids = None
        if args.clinic:
            clinic_ids = set(session.execute(select(Clinic.id).where(Clinic.name.in_(args.clinic))).scalars())
            if len(clinic_ids) != len(set(args.clinic)):
                print("error: unknown clinic", file=sys.stderr)
                return 2
        summary = export_reads(
            session, actor="cli", out=Path(args.out), clinic_ids=clinic_ids, since=args.since
        )
    print(
        f"{summary.rows} reads written to {args.out} ({summary.labels_made_with_ai_shown} made with the AI "
        f"score shown); {summary.held_back_open_appeal} held back under an open appeal"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="triage", description="On-premise AI triage for medical imaging.")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the API (and, by default, one in-process worker)")
    serve.add_argument("--host", default=None)
    serve.add_argument("--port", type=int, default=None)
    serve.add_argument(
        "--workers", type=int, default=None, choices=(0, 1), help="in-process workers (default 1)"
    )
    serve.set_defaults(func=_serve)

    worker = commands.add_parser("worker", help="run a scoring worker against the shared database")
    worker.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda:0")
    worker.add_argument("--batch", type=int, default=None, help="jobs per forward pass (default 16)")
    worker.add_argument(
        "--decode-workers", type=int, default=None, help="decode processes (default 0: in-thread)"
    )
    worker.set_defaults(func=_worker)

    commands.add_parser("migrate", help="bring the database schema up to date").set_defaults(func=_migrate)

    users = commands.add_parser("users", help="manage users and API keys").add_subparsers(
        dest="users_command", required=True
    )
    add = users.add_parser("add", help="create a user and print its API key once")
    add.add_argument("--name", required=True)
    add.add_argument("--role", required=True, choices=[r.value for r in auth.Role])
    add.add_argument("--clinic", action="append", default=[], help="clinic name; repeat for several")
    add.add_argument(
        "--password",
        action="store_true",
        help="also set a web-login password: read from TRIAGE_NEW_PASSWORD, else prompted (no echo)",
    )
    add.set_defaults(func=_users_add)
    revoke = users.add_parser("revoke", help="revoke an API key by its prefix")
    revoke.add_argument("prefix")
    revoke.set_defaults(func=_users_revoke)
    for verb, disabled in (("disable", True), ("enable", False)):
        toggle = users.add_parser(
            verb,
            help="disable a user (keys, password and web sessions stop working at once)"
            if disabled
            else "re-enable a disabled user",
        )
        toggle.add_argument("name")
        toggle.set_defaults(func=_users_disable, disabled=disabled)
    set_password = users.add_parser(
        "set-password",
        help="set or reset a web-login password: from TRIAGE_NEW_PASSWORD, else prompted (no echo)",
    )
    set_password.add_argument("name")
    set_password.set_defaults(func=_users_set_password)

    export = commands.add_parser(
        "export-reads", help="write confirmed reads as a labelled dataset for retraining (CSV, no pixels)"
    )
    export.add_argument("out", help="CSV file to write")
    export.add_argument("--clinic", action="append", default=[], help="clinic name; repeat for several")
    export.add_argument(
        "--since", type=datetime.fromisoformat, default=None, help="reads from (ISO time, with zone)"
    )
    export.set_defaults(func=_export_reads)

    audit_cli.add_commands(commands)
    models_cli.add_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except TriageError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
