"""Signed checkpoints: every N events or T seconds, an Ed25519 signature over the chain's head.

A hash chain alone shows edits, reorders and deletions in the middle, but not a cut tail:
the shorter chain still verifies. A checkpoint signs ``{count, head_seq, head_hash, at}``
with a key that is not in the database, so removing signed events, or rewriting them, is
caught by ``audit.verify.verify``. Events after the newest checkpoint are covered only by
the chain; the interval bounds that window.
"""

from __future__ import annotations

import base64
import logging
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from audit.copies import append_copy, copy_line
from audit.keys import key_id, load_or_create_signing_key, load_signing_key
from audit.log import GENESIS_HASH, AuditCheckpoint, AuditEvent, canonical, find_break, lock_writers

log = logging.getLogger("triage.audit")

SIGNING_CONTEXT = b"triage-audit-checkpoint-v1\n"
"""Prefixed to what is signed, so the key's signatures mean nothing in another protocol."""


class ChainBroken(Exception):
    """The events about to be signed do not verify; signing them would launder a tamper."""

    def __init__(self, seq: int, reason: str) -> None:
        super().__init__(reason)
        self.seq = seq
        self.reason = reason


def signed_bytes(*, count: int, head_seq: int, head_hash: str, at: str) -> bytes:
    """The exact bytes a checkpoint signature covers.

    Args:
        count: events in the chain up to and including ``head_seq``.
        head_seq: sequence number of the newest signed event.
        head_hash: its hash.
        at: when the checkpoint was made (ISO-8601 UTC text, as stored).

    Returns:
        ``SIGNING_CONTEXT`` followed by canonical JSON of the four fields.
    """
    body = {"at": at, "count": count, "head_hash": head_hash, "head_seq": head_seq}
    return SIGNING_CONTEXT + canonical(body)


def signature_valid(checkpoint: AuditCheckpoint, public_key: Ed25519PublicKey) -> bool:
    """Whether ``checkpoint`` was signed by the private half of ``public_key``.

    Args:
        checkpoint: a stored checkpoint.
        public_key: the key to verify with (kept outside the database).

    Returns:
        True for a good signature over exactly the stored fields, else False.
    """
    try:
        signature = base64.b64decode(checkpoint.signature, validate=True)
        public_key.verify(
            signature,
            signed_bytes(
                count=checkpoint.count,
                head_seq=checkpoint.head_seq,
                head_hash=checkpoint.head_hash,
                at=checkpoint.at,
            ),
        )
    except (InvalidSignature, ValueError):
        return False
    return True


def latest_checkpoint(session: Session) -> AuditCheckpoint | None:
    """The checkpoint with the highest ``head_seq`` (newest on ties).

    Args:
        session: any session on the audit database.

    Returns:
        The checkpoint, or None when none was ever written.
    """
    return session.execute(
        select(AuditCheckpoint).order_by(AuditCheckpoint.head_seq.desc(), AuditCheckpoint.id.desc()).limit(1)
    ).scalar_one_or_none()


def _head(session: Session) -> tuple[int, str] | None:
    row = session.execute(
        select(AuditEvent.seq, AuditEvent.hash).order_by(AuditEvent.seq.desc()).limit(1)
    ).first()
    return None if row is None else (row[0], row[1])


def tail_status(session: Session, copied_seq: int | None = None) -> dict[str, Any]:
    """A cheap live check for health: do the events since the newest checkpoint verify?

    Walks only the unsigned tail (at most the checkpoint interval's events) from the signed
    head, and checks that the signed head row still carries the signed hash. The full walk
    with signatures is ``triage audit verify``.

    Args:
        session: any session on the audit database.
        copied_seq: the newest head in the checkpoint copy outside the database
            (:func:`audit.copies.copied_head`); a chain that ends before it was cut.

    Returns:
        ``{"ok", "head_seq", "signed_seq", "signed_at", "unsigned", "broken_at"}``.
    """
    head = _head(session)
    last = latest_checkpoint(session)
    signed_seq = last.head_seq if last is not None else 0
    after = (0, GENESIS_HASH)
    broken_at: int | None = None
    if last is not None:
        signed_row = session.get(AuditEvent, last.head_seq)
        if signed_row is None or signed_row.hash != last.head_hash:
            broken_at = last.head_seq
        else:  # walk from the signed row itself, so an edit of its content shows too
            after = (last.head_seq - 1, signed_row.prev_hash)
    if broken_at is None and (found := find_break(session, after=after)) is not None:
        broken_at = found.seq
    head_seq = head[0] if head is not None else 0
    if broken_at is None and copied_seq is not None and copied_seq > head_seq:
        broken_at = head_seq + 1
    return {
        "ok": broken_at is None,
        "head_seq": head_seq,
        "signed_seq": signed_seq,
        "signed_at": last.at if last is not None else None,
        "unsigned": head_seq - signed_seq,
        "broken_at": broken_at,
    }


def is_due(session: Session, *, every_events: int, every_seconds: float, now: datetime | None = None) -> bool:
    """Whether unsigned events have piled up: ``every_events`` of them, or the oldest one is
    ``every_seconds`` old.

    Args:
        session: any session on the audit database (only reads).
        every_events: sign at the latest when this many events are unsigned.
        every_seconds: sign at the latest when the oldest unsigned event is this old.
        now: the current time (tests pass one).

    Returns:
        True when a checkpoint should be written now.
    """
    head = _head(session)
    last = latest_checkpoint(session)
    signed = last.head_seq if last is not None else 0
    if head is None or head[0] <= signed:
        return False
    if head[0] - signed >= every_events:
        return True
    oldest = session.execute(
        select(AuditEvent.at).where(AuditEvent.seq > signed).order_by(AuditEvent.seq).limit(1)
    ).scalar_one()
    age = (now or datetime.now(UTC)) - datetime.fromisoformat(oldest)
    return age >= timedelta(seconds=every_seconds)


def write_checkpoint(session: Session, key: Ed25519PrivateKey) -> AuditCheckpoint | None:
    """Sign the chain's current head in the caller's transaction (the caller commits).

    Holds the audit writers' lock, so the head cannot move while it is counted and signed.
    The events since the previous checkpoint are verified first: a tamper is reported, not
    signed over.

    Args:
        session: a write session.
        key: the signing key.

    Returns:
        The new checkpoint, or None when the chain is empty or its head is already signed.

    Raises:
        ChainBroken: the unsigned events do not chain onto the previous checkpoint.
    """
    lock_writers(session)
    head = _head(session)
    last = latest_checkpoint(session)
    if head is None or (last is not None and last.head_seq >= head[0]):
        return None
    after = (last.head_seq, last.head_hash) if last is not None else (0, GENESIS_HASH)
    found = find_break(session, after=after)
    if found is not None:
        raise ChainBroken(found.seq, found.reason)
    unsigned = session.execute(
        select(func.count())
        .select_from(AuditEvent)
        .where(AuditEvent.seq > after[0], AuditEvent.seq <= head[0])
    ).scalar_one()
    count = (last.count if last is not None else 0) + unsigned
    at = datetime.now(UTC).isoformat(timespec="microseconds")
    signature = key.sign(signed_bytes(count=count, head_seq=head[0], head_hash=head[1], at=at))
    checkpoint = AuditCheckpoint(
        at=at,
        count=count,
        head_seq=head[0],
        head_hash=head[1],
        key_id=key_id(key.public_key()),
        signature=base64.b64encode(signature).decode(),
    )
    session.add(checkpoint)
    session.flush()
    return checkpoint


class Checkpointer:
    """Writes a checkpoint whenever one is due; run it as a thread, or once from the CLI.

    Several processes (API, workers) may each run one: they serialise on the writers' lock
    and only the first signs a given head.
    """

    def __init__(
        self,
        factory: sessionmaker[Session],
        *,
        key_path: Path,
        every_events: int,
        every_seconds: float,
        reads: sessionmaker[Session] | None = None,
        poll_seconds: float = 1.0,
        create_key: bool = True,
        copy_path: Path | None = None,
    ) -> None:
        """Args:
        factory: write sessions (on SQLite they take the write lock).
        key_path: the signing key file, created 0600 on first use.
        every_events: sign when this many events are unsigned.
        every_seconds: sign when the oldest unsigned event is this old.
        reads: read sessions for the cheap "is one due?" poll; defaults to ``factory``.
        poll_seconds: how often the thread asks.
        create_key: create the key file if absent. Pass False in processes on other hosts
            (remote workers): a second key would sign checkpoints ``verify`` rejects.
        copy_path: also append each checkpoint to this file (:mod:`audit.copies`), on
            other storage than the database; None keeps no copy.
        """
        if every_events < 1 or every_seconds <= 0 or poll_seconds <= 0:
            raise ValueError("checkpoint intervals must be positive")
        self.factory = factory
        self.reads = reads or factory
        self.key_path = key_path
        self.every_events = every_events
        self.every_seconds = every_seconds
        self.poll_seconds = min(poll_seconds, every_seconds)
        self.create_key = create_key
        self.copy_path = copy_path
        self._key: Ed25519PrivateKey | None = None

    @property
    def key(self) -> Ed25519PrivateKey:
        """The signing key, read (or created) on first use.

        Raises:
            AuditKeyError: the key file is unusable.
        """
        if self._key is None:
            load = load_or_create_signing_key if self.create_key else load_signing_key
            self._key = load(self.key_path)
        return self._key

    def run_once(self, *, force: bool = False) -> AuditCheckpoint | None:
        """Write a checkpoint if one is due (or, with ``force``, if anything is unsigned).

        Args:
            force: sign the head now, whatever the intervals say.

        Returns:
            The new checkpoint, or None when nothing needed signing.

        Raises:
            ChainBroken: the unsigned events do not verify.
            AuditKeyError: the key file is unusable.
        """
        if not force:
            with self.reads() as session:
                if not is_due(session, every_events=self.every_events, every_seconds=self.every_seconds):
                    return None
        with self.factory() as session, session.begin():
            checkpoint = write_checkpoint(session, self.key)
            line = copy_line(checkpoint) if checkpoint is not None else None
        if line is not None and self.copy_path is not None:
            # After the commit: a copied head always exists in the database. If this append
            # fails, the next checkpoint's line still covers these events.
            try:
                append_copy(self.copy_path, line)
            except OSError as exc:
                log.error("audit checkpoint copy not written (%s)", type(exc).__name__)
        if line is not None:
            # A third copy, in the system log (journald, syslog): a place the service's
            # own user cannot rewrite.
            log.info("audit checkpoint %s", line.decode().strip())
        return checkpoint

    def run(self, stop: threading.Event) -> None:
        """Poll until ``stop`` is set, then sign whatever is still unsigned.

        Errors are logged (by type only) and retried at the next poll; a broken chain is
        logged at ERROR every time it is seen.

        Args:
            stop: set it to end the loop.
        """
        while not stop.wait(self.poll_seconds):
            self._guarded(force=False)
        self._guarded(force=True)

    def _guarded(self, *, force: bool) -> None:
        try:
            self.run_once(force=force)
        except ChainBroken as exc:
            log.error("audit chain broken, not signing: %s", exc.reason)
        except Exception as exc:  # the next poll tries again
            log.error("audit checkpoint failed (%s)", type(exc).__name__)

    def start(self, stop: threading.Event) -> threading.Thread:
        """Load the key (so a bad key fails at start-up) and run ``run`` in a daemon thread.

        Args:
            stop: set it to stop the thread; join the returned thread afterwards.

        Returns:
            The started thread.

        Raises:
            AuditKeyError: the key file is unusable.
        """
        _ = self.key
        thread = threading.Thread(target=self.run, args=(stop,), name="triage-audit-checkpoint", daemon=True)
        thread.start()
        return thread
