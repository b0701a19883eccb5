"""``triage audit verify | checkpoint | public-key``: the audit package wired to the settings."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from audit.checkpoint import ChainBroken, Checkpointer
from audit.copies import load_copies
from audit.keys import (
    AuditKeyError,
    load_or_create_signing_key,
    load_public_key,
    load_signing_key,
    public_key_pem,
)
from audit.log import EventCode, Outcome, record
from audit.verify import verify
from triage_api.db import make_engine, make_sessionmaker, migrate, transaction
from triage_api.settings import Settings


def _verify(args: argparse.Namespace) -> int:
    settings = Settings()
    try:
        public_key = (
            load_public_key(Path(args.public_key))
            if args.public_key
            else load_signing_key(settings.audit_key_path).public_key()
        )
    except AuditKeyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    copy_path = Path(args.copy) if args.copy else settings.audit_copy_path
    copies, unreadable = load_copies(copy_path)
    if not copy_path.exists():
        if args.copy:
            unreadable = [f"the checkpoint copy {copy_path} is missing"]
        else:
            print(
                f"note: no checkpoint copy at {copy_path}: a tail cut together with its "
                "checkpoints would not show (pass --copy with the copy from its backup)",
                file=sys.stderr,
            )
    reads = make_engine(settings.sqlalchemy_url, read_only=True)
    try:
        with make_sessionmaker(reads)() as session:
            report = verify(session, public_key, copies=copies)
    finally:
        reads.dispose()
    report.problems += unreadable
    for problem in report.problems:
        print(f"BROKEN: {problem}", file=sys.stderr)
    if report.ok:
        print(
            f"ok: {report.events} events verified, {report.checkpoints} checkpoints, "
            f"{report.copies} copied checkpoints ({copy_path}), signed up to event {report.signed_head}"
        )
    elif report.first_bad_seq is not None:
        print(f"first bad sequence number: {report.first_bad_seq}")
    if not args.no_record:
        engine = make_engine(settings.sqlalchemy_url)
        try:
            with transaction(make_sessionmaker(engine)) as session:
                record(
                    session,
                    actor="cli",
                    action="audit.verify",
                    code=EventCode.AUDIT_LOG_USED,
                    object_type="audit",
                    object_id="audit_events",
                    outcome=Outcome.SUCCESS if report.ok else Outcome.SERIOUS_FAILURE,
                    details=_summary(report.ok, report.events, report.first_bad_seq),
                )
        finally:
            engine.dispose()
    return 0 if report.ok else 1


def _summary(ok: bool, events: int, first_bad: int | None) -> dict[str, Any]:
    return {"ok": ok, "events": events, "first_bad_seq": first_bad}


def _checkpoint(args: argparse.Namespace) -> int:
    settings = Settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.sqlalchemy_url)
    try:
        migrate(engine)
        checkpointer = Checkpointer(
            make_sessionmaker(engine),
            key_path=settings.audit_key_path,
            every_events=settings.audit_checkpoint_events,
            every_seconds=settings.audit_checkpoint_seconds,
            copy_path=settings.audit_copy_path,
        )
        checkpoint = checkpointer.run_once(force=not args.if_due)
    except AuditKeyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ChainBroken as exc:
        print(f"BROKEN: {exc.reason}; not signed", file=sys.stderr)
        print(f"first bad sequence number: {exc.seq}")
        return 1
    finally:
        engine.dispose()
    if checkpoint is None:
        print("nothing to sign")
    else:
        print(f"checkpoint {checkpoint.id}: {checkpoint.count} events, head {checkpoint.head_seq}")
    return 0


def _public_key(args: argparse.Namespace) -> int:
    settings = Settings()
    try:
        key = load_or_create_signing_key(settings.audit_key_path)
    except AuditKeyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    pem = public_key_pem(key.public_key())
    if args.out:
        Path(args.out).write_text(pem)
    else:
        sys.stdout.write(pem)
    return 0


def add_commands(subparsers: Any) -> None:
    """Register ``audit verify|checkpoint|public-key`` on the ``triage`` parser.

    Args:
        subparsers: what ``ArgumentParser.add_subparsers()`` returned.
    """
    audit = subparsers.add_parser("audit", help="verify and sign the audit trail").add_subparsers(
        dest="audit_command", required=True
    )
    check = audit.add_parser(
        "verify", help="walk the chain, check every signed checkpoint; exit 1 and name the first bad event"
    )
    check.add_argument(
        "--public-key", default=None, help="PEM public key (default: derived from the local signing key)"
    )
    check.add_argument("--no-record", action="store_true", help="do not audit this verification")
    check.add_argument(
        "--copy",
        default=None,
        help="the checkpoint copy to check against (default: TRIAGE_AUDIT_CHECKPOINT_COPY, if present)",
    )
    check.set_defaults(func=_verify)
    sign = audit.add_parser("checkpoint", help="sign the chain's head now")
    sign.add_argument("--if-due", action="store_true", help="only if the configured interval says so")
    sign.set_defaults(func=_checkpoint)
    export = audit.add_parser("public-key", help="print the checkpoint key's public half (PEM)")
    export.add_argument("--out", default=None, help="write it to this file instead")
    export.set_defaults(func=_public_key)
