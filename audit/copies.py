"""An append-only copy of the signed checkpoints, outside the database.

A checkpoint in the database proves the events up to its head existed, but someone who
can delete rows can delete the newest events *and* the checkpoints that signed them: the
shorter chain and the older checkpoints still verify. Each checkpoint is therefore also
appended, as one JSON line, to a file on other storage (by default next to the signing
key, which already must not live with the database). ``audit.verify.verify`` takes the
copy's checkpoints as further signed heads: a head beyond the chain's end shows the cut.

The copy holds only what the checkpoint holds (counts, sequence numbers, hashes, time,
key id, signature): no patient data.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from audit.log import AuditCheckpoint

FIELDS = ("at", "count", "head_seq", "head_hash", "key_id", "signature")


def copy_line(checkpoint: AuditCheckpoint) -> bytes:
    """The line appended for ``checkpoint``: compact JSON of :data:`FIELDS`, then a newline."""
    body = {name: getattr(checkpoint, name) for name in FIELDS}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode() + b"\n"


def append_copy(path: Path, line: bytes) -> None:
    """Append one :func:`copy_line` to ``path`` (created 0600, its folder 0700) and fsync it.

    One ``write`` with ``O_APPEND``: processes signing on the same host do not interleave.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_copies(path: Path) -> tuple[list[AuditCheckpoint], list[str]]:
    """The checkpoints in a copy file, and a problem for each line that cannot be read.

    A last line without its newline is what a crash during the append leaves: it is
    skipped, not reported. The checkpoints are not attached to any session.

    Raises:
        OSError: the file cannot be read.
    """
    checkpoints: list[AuditCheckpoint] = []
    problems: list[str] = []
    lines = path.read_bytes().split(b"\n")
    for number, line in enumerate(lines[:-1], start=1):  # lines[-1]: b"" or a torn append
        try:
            body = json.loads(line)
            values = {name: body[name] for name in FIELDS}
            if not (isinstance(values["count"], int) and isinstance(values["head_seq"], int)):
                raise TypeError
            if not all(isinstance(values[name], str) for name in ("at", "head_hash", "key_id", "signature")):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            problems.append(f"line {number} of the checkpoint copy cannot be read")
            continue
        checkpoints.append(AuditCheckpoint(**values))
    return checkpoints, problems


def load_copies(path: Path) -> tuple[list[AuditCheckpoint], list[str]]:
    """:func:`read_copies`, with no copy (no file yet) as no checkpoints and an unreadable
    file as a problem."""
    if not path.exists():
        return [], []
    try:
        return read_copies(path)
    except OSError as exc:
        return [], [f"the checkpoint copy cannot be read ({type(exc).__name__})"]


def copied_head(path: Path, tail_bytes: int = 8192) -> int | None:
    """The highest ``head_seq`` among the copy's last lines (unverified: a cheap health
    check, reading only the file's end), or None when there is none."""
    try:
        with path.open("rb") as fh:
            start = max(0, fh.seek(0, os.SEEK_END) - tail_bytes)
            fh.seek(start)
            pieces = fh.read().split(b"\n")
    except OSError:
        return None
    # The last piece is b"" or a torn append; the first is cut unless the read began at 0.
    heads = []
    for line in pieces[(1 if start else 0) : -1]:
        try:
            heads.append(int(json.loads(line)["head_seq"]))
        except (ValueError, KeyError, TypeError):
            continue
    return max(heads, default=None)
