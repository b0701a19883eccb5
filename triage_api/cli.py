"""The ``triage`` command: serve, worker, users, migrate, doctor, backup, restore (and the model
commands).

Every command reads the site's config file first (``--config``, else /etc/triage/triage.env
when present), so an operator's shell finds the service's data. Only ``serve``, ``migrate``
and ``restore`` may create a database; the others refuse a site without one.
"""

from __future__ import annotations

import argparse
import getpass
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from audit.log import EventCode, record
from models import cli as models_cli
from triage_api import audit_cli, auth, users
from triage_api.blobs import PRIVATE_UMASK
from triage_api.db import make_engine, make_sessionmaker, migrate, transaction
from triage_api.errors import NotPermitted, TriageError
from triage_api.ingest import quiet_pydicom
from triage_api.settings import SITE_CONFIG, ConfigFileError, Settings, load_config_file
from triage_api.vocab import AiMode

CREATES_SITE = frozenset({"serve", "migrate", "restore"})
"""Commands that may start from no database; the rest need the site's (see :func:`_require_site`)."""
NO_DATABASE = frozenset({"doctor", "train", "evaluate", "models"})
"""Commands that do not use the site's database, or (``doctor``) report on it instead."""


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from triage_api.app import create_app

    run_worker = None if args.workers is None else args.workers > 0
    overrides = {"host": args.host, "port": args.port, "run_worker": run_worker}
    settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    # Idle keep-alive connections close after 5 s, so slow or idle clients cannot hold them.
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level="info",
        timeout_keep_alive=5,
        timeout_graceful_shutdown=30,
    )
    return 0


def _worker(args: argparse.Namespace) -> int:
    from triage_api.worker import Worker, load_model

    quiet_pydicom()
    overrides = {"device": args.device, "batch_size": args.batch, "decode_workers": args.decode_workers}
    settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    engine = make_engine(settings.sqlalchemy_url)
    worker = Worker(make_sessionmaker(engine), settings, load_model(settings))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    worker.run(stop)
    engine.dispose()
    return 0


def _migrate(args: argparse.Namespace) -> int:
    from triage_api.site import current_revision, head_revision, site_problem, sqlite_path

    settings = Settings()
    if args.check:
        problem = site_problem(settings)
        print(problem or f"schema at {head_revision()}: current")
        return 1 if problem else 0
    settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    database = sqlite_path(settings)
    if database is not None:
        database.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    engine = make_engine(settings.sqlalchemy_url)
    try:
        before = current_revision(engine)
        migrate(engine)
    finally:
        engine.dispose()
    print(f"schema {before or 'empty'} -> {head_revision()}")
    return 0


def _doctor(_args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from triage_api.site import Finding, doctor

    try:
        findings = doctor(Settings())
    except ValidationError as exc:
        problems = "; ".join(
            f"TRIAGE_{'_'.join(map(str, error['loc'])).upper()}: {error['msg']}" for error in exc.errors()
        )
        findings = [Finding("settings", "fail", problems, "correct the value in the config file")]
    for finding in findings:
        print(f"{finding.level.upper():5} {finding.name}: {finding.message}")
        if finding.fix:
            print(f"      fix: {finding.fix}")
    return 1 if any(f.level == "fail" for f in findings) else 0


def _backup(args: argparse.Namespace) -> int:
    from triage_api.backup import BackupError, backup

    try:
        summary = backup(Settings(), Path(args.dest), link_dest=args.link_dest)
    except BackupError as exc:
        raise NotPermitted(str(exc)) from None
    print(
        f"backup in {summary.folder}: {summary.cases} cases, {summary.blobs} blobs, "
        f"{summary.audit_events} audit events, {summary.bytes / 1e6:.1f} MB in {summary.seconds:.1f} s"
    )
    return 0


def _restore(args: argparse.Namespace) -> int:
    from triage_api.backup import PUBLIC_KEY_FILE, BackupError, restore

    settings = Settings()
    try:
        summary = restore(settings, Path(args.src))
    except BackupError as exc:
        raise NotPermitted(str(exc)) from None
    print(
        f"restored into {summary.folder}: {summary.cases} cases, {summary.blobs} blobs, "
        f"{summary.audit_events} audit events, {summary.bytes / 1e6:.1f} MB in {summary.seconds:.1f} s"
    )
    if not settings.audit_key_path.is_file():
        print(
            f"next: put the signing key back at {settings.audit_key_path} from its own backup before "
            f"`triage serve` (else a new key signs from now on); until then verify with "
            f"`triage audit verify --public-key {settings.data_dir / PUBLIC_KEY_FILE}`"
        )
    return 0


def _require_site(settings: Settings, config: Path | None) -> None:
    """Refuse to run against a database that is missing, unreachable or at another schema.

    Raises:
        NotPermitted: with where the settings came from and what to do.
    """
    from triage_api.site import site_problem

    problem = site_problem(settings)
    if problem is None:
        return
    source = f"config {config}" if config else "no config file"
    raise NotPermitted(
        f"{problem} ({source}, TRIAGE_DATA_DIR={settings.data_dir}). Run this on the service's host "
        f"with its settings (--config FILE, or TRIAGE_DATA_DIR/TRIAGE_DATABASE_URL), or create or "
        f"upgrade the database with `triage migrate`; `triage doctor` checks the site"
    )


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

    settings = Settings()
    password = _new_password() if args.password else None
    engine = make_engine(settings.sqlalchemy_url)
    try:
        with transaction(make_sessionmaker(engine)) as session:
            _, key = users.create_user(
                session,
                actor="cli",
                name=args.name,
                role=auth.Role(args.role),
                clinics=args.clinic,
                password=password,
            )
    except InvalidRequest as exc:
        raise NotPermitted(exc.message) from None
    print(key)
    return 0


def _users_revoke(args: argparse.Namespace) -> int:
    from triage_api.errors import NotFound

    settings = Settings()
    engine = make_engine(settings.sqlalchemy_url)
    try:
        with transaction(make_sessionmaker(engine)) as session:
            users.revoke_key(session, actor="cli", prefix=args.prefix)
    except NotFound:
        print(f"no key with prefix {args.prefix}", file=sys.stderr)
        return 1
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


@contextmanager
def _database(settings: Settings) -> Iterator[sessionmaker[Session]]:
    """The site's database for one command (checked by ``_require_site``), closed afterwards."""
    engine = make_engine(settings.sqlalchemy_url)
    try:
        yield make_sessionmaker(engine)
    finally:
        engine.dispose()


def _export_reads(args: argparse.Namespace) -> int:
    from sqlalchemy import select

    from triage_api.export import export_reads
    from triage_api.tables import Clinic

    settings = Settings()
    with _database(settings) as factory, transaction(factory) as session:
        clinic_ids = None
        if args.clinic:
            clinic_ids = set(session.execute(select(Clinic.id).where(Clinic.name.in_(args.clinic))).scalars())
            if len(clinic_ids) != len(set(args.clinic)):
                print("error: unknown clinic", file=sys.stderr)
                return 2
        summary = export_reads(
            session,
            actor="cli",
            out=Path(args.out),
            clinic_ids=clinic_ids,
            since=args.since,
            include_ai_shown=args.include_ai_shown,
        )
    print(
        f"{summary.rows} reads written to {args.out} ({summary.labels_made_with_ai_shown} made with the AI "
        f"score shown); {summary.held_back_open_appeal} held back under an open appeal; "
        f"{summary.excluded_ai_shown} left out because the AI score was shown"
    )
    return 0


def _clinics_mode(args: argparse.Namespace) -> int:
    from triage_api import golive
    from triage_api.api.clinics import live_card
    from triage_api.errors import TriageError

    settings = Settings()
    try:
        with _database(settings) as factory, transaction(factory) as session:
            clinic = golive.set_mode(
                session,
                actor="cli",
                clinic_name=args.clinic,
                mode=AiMode(args.mode),
                reason=args.reason,
                override_reason=args.override_reason,
                card=live_card(settings),
                settings=settings,
                blind_sample_rate=args.blind_sample_rate,
            )
            rate = golive.blind_rate(clinic, settings)
            print(f"{clinic.name}: AI {clinic.ai_mode}, AI-blind sample {rate:.1%}")
    except TriageError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    return 0


def _validation(args: argparse.Namespace) -> int:
    import json

    from triage_api import golive
    from triage_api.api.clinics import live_card
    from triage_api.errors import TriageError

    settings = Settings()
    try:
        with _database(settings) as factory, transaction(factory) as session:
            clinic = golive.clinic_named(session, args.clinic)
            if args.challenger:
                report = golive.compare(
                    session, clinic=clinic, card=live_card(settings), challenger_ref=args.challenger
                )
            else:
                report = golive.validation(
                    session, clinic=clinic, card=live_card(settings), model_ref=args.model
                )
            record(
                session,
                actor="cli",
                action="clinic.comparison" if args.challenger else "clinic.validation",
                code=EventCode.QUERY,
                object_type="clinic",
                object_id=str(clinic.id),
                details={"n_reads": report["n_reads"]},
            )
    except TriageError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2, default=str))
    return 0


def _models_shadow(args: argparse.Namespace) -> int:
    from datetime import UTC

    from triage_api import golive
    from triage_api.api.clinics import live_card
    from triage_api.errors import TriageError

    settings = Settings()
    path = Path(args.model)
    if not path.is_dir():
        found = models_cli.bundle_dirs([models_cli.DEFAULT_BUNDLES, models_cli.LOCAL_BUNDLES])
        path = next((p for p in found if _ref_of(p) == args.model), path)
    try:
        with _database(settings) as factory, transaction(factory) as session:
            if args.stop:
                stopped = golive.stop_challenger(
                    session, actor="cli", clinic_name=args.clinic, model_ref=_ref_of(path) or args.model
                )
                print(f"challenger {stopped.model_ref} no longer scores {args.clinic}'s studies")
                return 0
            row = golive.add_challenger(
                session,
                actor="cli",
                clinic_name=args.clinic,
                bundle_path=path,
                live=live_card(settings),
                now=datetime.now(UTC),
            )
            print(f"challenger {row.model_ref} scores {args.clinic}'s studies in shadow (id {row.id})")
    except TriageError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    return 0


def _ref_of(path: Path) -> str | None:
    from models.bundle import BundleError, read_card

    try:
        return read_card(path).ref
    except BundleError:
        return None


def _dicom_listener(args: argparse.Namespace) -> int:
    from triage_api.app import read_or_create_secret
    from triage_api.dicom.listener import StorageListener

    quiet_pydicom()
    overrides = {"host": args.host, "dicom_port": args.port}
    settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    engine = make_engine(settings.sqlalchemy_url)
    factory = make_sessionmaker(engine)
    listener = StorageListener(
        factory,
        reads=factory,
        settings=settings,
        pseudonym_key=read_or_create_secret(settings.secret_dir / "pseudonym.key"),
    )
    port = listener.start(settings.host, settings.dicom_port if settings.dicom_port is not None else 11112)
    print(f"DICOM listener {settings.dicom_ae_title} on {settings.host}:{port}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    listener.stop()
    engine.dispose()
    return 0


def _dicom_config(args: argparse.Namespace) -> int:
    from triage_api.dicom import peers
    from triage_api.errors import TriageError

    settings = Settings()
    engine = make_engine(settings.sqlalchemy_url)
    now = datetime.now(UTC)
    try:
        with transaction(make_sessionmaker(engine)) as session:
            if args.dicom_command == "pacs":
                peers.set_pacs(
                    session, clinic=args.clinic, ae=args.ae_title, host=args.host, port=args.port, now=now
                )
                action, details = (
                    "dicom.pacs.set",
                    {"ae_title": args.ae_title, "host": args.host, "port": args.port},
                )
            else:
                peer = peers.add_peer(session, clinic=args.clinic, ae=args.ae_title, host=args.host, now=now)
                action, details = "dicom.peer.add", {"ae_title": peer.ae_title, "host": peer.host}
            record(
                session,
                actor="cli",
                action=action,
                code=EventCode.SECURITY_ALERT,
                object_type="clinic",
                object_id=args.clinic,
                details=details,
            )
    except TriageError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    return 0


def _export_dicom(args: argparse.Namespace) -> int:
    from sqlalchemy import select

    from triage_api.app import read_or_create_secret
    from triage_api.deid import export_dicom
    from triage_api.tables import Clinic

    if not args.deidentify:
        print("error: only de-identified export exists; pass --deidentify", file=sys.stderr)
        return 2
    quiet_pydicom()
    settings = Settings()
    engine = make_engine(settings.sqlalchemy_url)
    try:
        with transaction(make_sessionmaker(engine)) as session:
            clinic = select(Clinic.id).where(Clinic.name == args.clinic)
            clinic_id = session.execute(clinic).scalar_one_or_none()
            if clinic_id is None:
                print("error: unknown clinic", file=sys.stderr)
                return 2
            report = export_dicom(
                session,
                actor="cli",
                clinic_id=clinic_id,
                out=Path(args.out),
                blob_dir=settings.blob_dir,
                site_secret=read_or_create_secret(settings.secret_dir / "pseudonym.key"),
                since=args.since,
            )
    finally:
        engine.dispose()
    print(f"{report.written} de-identified studies written to {args.out}, with reads.csv")
    for case_id, reason in report.refused.items():
        print(f"refused case {case_id}: {reason}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="triage", description="On-premise AI triage for medical imaging.")
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help=f"site settings file (NAME=value lines, as systemd reads them; default {SITE_CONFIG})",
    )
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

    schema = commands.add_parser("migrate", help="create the database or bring its schema up to date")
    schema.add_argument(
        "--check", action="store_true", help="change nothing; exit 1 unless the schema is current (CI/CD)"
    )
    schema.set_defaults(func=_migrate)

    commands.add_parser(
        "doctor", help="check the site: permissions, keys, disk, database, model, clock; say what to fix"
    ).set_defaults(func=_doctor)

    save = commands.add_parser("backup", help="copy the site consistently into a new folder, while it runs")
    save.add_argument("dest", help="a new or empty folder")
    save.add_argument(
        "--link-dest",
        type=Path,
        default=None,
        help="an earlier backup on the same file system: hard-link the blobs it holds (incremental)",
    )
    save.set_defaults(func=_backup)
    back = commands.add_parser("restore", help="restore a backup into an empty site (checks every sha256)")
    back.add_argument("src", help="a folder written by `triage backup`")
    back.set_defaults(func=_restore)

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
    export.add_argument(
        "--include-ai-shown",
        action="store_true",
        help="also export labels made with the AI score on screen (left out by default: feedback loops)",
    )
    export.set_defaults(func=_export_reads)

    clinics = commands.add_parser("clinics", help="clinic settings").add_subparsers(
        dest="clinics_command", required=True
    )
    mode = clinics.add_parser("mode", help="set a clinic's AI mode: shadow, live or off (audited)")
    mode.add_argument("clinic")
    mode.add_argument("mode", choices=[m.value for m in AiMode])
    mode.add_argument("--reason", required=True)
    mode.add_argument("--override-reason", help="go live although the local validation is insufficient")
    mode.add_argument(
        "--blind-sample-rate", type=float, help="share of a live clinic's studies read AI-blind"
    )
    mode.set_defaults(func=_clinics_mode)

    validation = commands.add_parser("validation", help="local validation of a clinic on its AI-blind reads")
    validation.add_argument("clinic")
    validation.add_argument("--model", help="name@version (default: the live model)")
    validation.add_argument("--challenger", help="name@version: compare it with the live model (paired CI)")
    validation.set_defaults(func=_validation)

    listener = commands.add_parser("dicom-listener", help="run the DICOM C-STORE listener (storage SCP)")
    listener.add_argument("--host", default=None, help="bind address (default TRIAGE_HOST)")
    listener.add_argument("--port", type=int, default=None, help="default TRIAGE_DICOM_PORT, else 11112")
    listener.set_defaults(func=_dicom_listener)

    dicom = commands.add_parser("dicom", help="DICOM peers and PACS destinations").add_subparsers(
        dest="dicom_group", required=True
    )
    peer_commands = dicom.add_parser("peers", help="senders allowed per clinic").add_subparsers(
        dest="peers_command", required=True
    )
    peer_add = peer_commands.add_parser("add", help="allow a calling AE title (and address) for a clinic")
    peer_add.add_argument("--clinic", required=True)
    peer_add.add_argument("--ae-title", required=True)
    peer_add.add_argument("--host", default=None, help="the peer's IP address (default: any)")
    peer_add.set_defaults(func=_dicom_config, dicom_command="peer")
    pacs = dicom.add_parser("pacs", help="where a clinic's AI results (SR) are sent").add_subparsers(
        dest="pacs_command", required=True
    )
    pacs_set = pacs.add_parser("set", help="set a clinic's PACS (C-STORE destination)")
    pacs_set.add_argument("--clinic", required=True)
    pacs_set.add_argument("--ae-title", required=True)
    pacs_set.add_argument("--host", required=True)
    pacs_set.add_argument("--port", type=int, required=True)
    pacs_set.set_defaults(func=_dicom_config, dicom_command="pacs")

    export_dicom = commands.add_parser(
        "export-dicom", help="write a clinic's DICOM studies de-identified (PS3.15 Annex E), with reads"
    )
    export_dicom.add_argument("--clinic", required=True, help="clinic name")
    export_dicom.add_argument("--out", required=True, help="directory to write to")
    export_dicom.add_argument(
        "--deidentify", action="store_true", help="required: the Basic Profile with modified dates"
    )
    export_dicom.add_argument(
        "--since",
        type=datetime.fromisoformat,
        default=None,
        help="studies received from (ISO time, with zone)",
    )
    export_dicom.set_defaults(func=_export_dicom)

    audit_cli.add_commands(commands)
    models_cli.add_commands(commands)
    models = next(
        action
        for action in commands.choices["models"]._actions
        if isinstance(action, argparse._SubParsersAction)
    )
    shadow = models.add_parser("shadow", help="score a clinic's studies with a challenger too, never shown")
    shadow.add_argument("model", help="name@version of an imported bundle, or a bundle folder")
    shadow.add_argument("--clinic", required=True)
    shadow.add_argument("--stop", action="store_true", help="stop scoring with it (its scores are kept)")
    shadow.set_defaults(func=_models_shadow)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    args = build_parser().parse_args(argv)
    os.umask(PRIVATE_UMASK)  # every file any command writes (database, blobs, exports) is private
    config: Path | None = args.config or (SITE_CONFIG if SITE_CONFIG.is_file() else None)
    if config is not None:
        try:
            load_config_file(config)
        except (ConfigFileError, OSError) as exc:
            print(f"error: config file: {exc}", file=sys.stderr)
            return 2
    try:
        if args.command not in CREATES_SITE | NO_DATABASE:
            _require_site(Settings(), config)
        return int(args.func(args))
    except TriageError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
