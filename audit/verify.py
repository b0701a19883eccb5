"""Verify the whole audit trail: the hash chain, and every signed checkpoint against it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import select
from sqlalchemy.orm import Session

from audit.checkpoint import signature_valid
from audit.keys import key_id
from audit.log import AuditCheckpoint, find_break


@dataclass
class Report:
    """What ``verify`` found. ``problems`` name sequence numbers and checkpoint ids only."""

    events: int = 0
    """Events that verified, from seq 1 on."""
    checkpoints: int = 0
    """Checkpoints in the database examined."""
    copies: int = 0
    """Checkpoints from the copy outside the database examined."""
    signed_head: int = 0
    """The highest ``head_seq`` among checkpoints with a good signature."""
    first_bad_seq: int | None = None
    """The first sequence number that is missing, altered or contradicts a checkpoint."""
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when nothing at all was wrong."""
        return not self.problems

    def _bad(self, seq: int, problem: str) -> None:
        self.problems.append(problem)
        if self.first_bad_seq is None or seq < self.first_bad_seq:
            self.first_bad_seq = seq


def _name(checkpoint: AuditCheckpoint) -> str:
    return f"checkpoint {checkpoint.id}" if checkpoint.id is not None else "copied checkpoint"


def verify(
    session: Session,
    public_key: Ed25519PublicKey,
    *,
    batch: int = 10_000,
    copies: Sequence[AuditCheckpoint] = (),
) -> Report:
    """Walk the chain and check every checkpoint: signature, count and head hash.

    A checkpoint whose head lies beyond the chain's end proves the tail was cut; the first
    missing sequence number is then the first bad one. A checkpoint with a bad signature
    (forged, or signed by another key) is a problem in itself and makes its head suspect.

    Args:
        session: any session on the audit database (only reads).
        public_key: the checkpoint key's public half, ideally from outside this machine.
        batch: rows fetched per round trip.
        copies: checkpoints from the copy outside the database (:mod:`audit.copies`),
            checked like the stored ones: they catch a tail cut together with its
            checkpoints.

    Returns:
        The report; ``report.ok`` is False on any problem.
    """
    report = Report()
    checkpoints = list(
        session.execute(
            select(AuditCheckpoint).order_by(AuditCheckpoint.head_seq, AuditCheckpoint.id)
        ).scalars()
    )
    report.checkpoints = len(checkpoints)
    report.copies = len(copies)
    expected_key = key_id(public_key)
    trusted: dict[int, list[AuditCheckpoint]] = {}
    for checkpoint in [*checkpoints, *copies]:
        if not signature_valid(checkpoint, public_key):
            other = " (signed by another key)" if checkpoint.key_id != expected_key else ""
            report._bad(
                checkpoint.head_seq,
                f"{_name(checkpoint)} (head {checkpoint.head_seq}) has a bad signature{other}",
            )
            continue
        trusted.setdefault(checkpoint.head_seq, []).append(checkpoint)
        report.signed_head = max(report.signed_head, checkpoint.head_seq)

    matched = 0  # the newest signed head the chain agreed with

    def on_row(seq: int, hash_: str) -> None:
        nonlocal matched
        report.events += 1
        for checkpoint in trusted.get(seq, ()):
            if checkpoint.head_hash != hash_:
                # A consistent rewrite: the chain links, but not to what was signed. The
                # change lies after the previous matching head, the last event still vouched for.
                report._bad(
                    matched + 1,
                    f"event {seq} differs from what {_name(checkpoint)} signed: "
                    f"events {matched + 1}..{seq} were rewritten",
                )
            elif checkpoint.count != report.events:
                report._bad(
                    seq,
                    f"{_name(checkpoint)} signed {checkpoint.count} events up to {seq}, "
                    f"the chain has {report.events}",
                )
            else:
                matched = seq

    found = find_break(session, on_row=on_row, batch=batch)
    if found is not None:
        report._bad(found.seq, found.reason)
    elif report.signed_head > report.events:
        # The chain verifies but ends before a signed head: its tail was removed.
        report._bad(
            report.events + 1,
            f"the chain ends at event {report.events} but a checkpoint signed events up to "
            f"{report.signed_head}: events from {report.events + 1} were removed",
        )
    return report
