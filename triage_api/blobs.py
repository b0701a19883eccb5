"""The blob store on disk: where a study's bytes live, and the one way files are written.

Studies are content-addressed: a blob is named by its sha256 under a two-character fan-out
directory, so a retried upload finds its bytes already there. Every file the service
writes (blobs, heat-map caches, exports, site secrets) goes through
:func:`write_atomically`: a reader never sees half a file, and a crash after it returns
loses nothing.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path

PRIVATE_UMASK = 0o077


def make_private(data_dir: Path) -> None:
    """From now on this process creates files 0600 and folders 0700, and ``data_dir``
    (created if absent) is 0700: studies, heat maps, the database and its WAL are readable
    by the service's user only, whatever the umask it was started with.

    The unit file sets ``UMask=0077`` too; this covers a manual start and files made
    before the first write here.
    """
    os.umask(PRIVATE_UMASK)
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    data_dir.chmod(0o700)


def blob_path(blob_dir: Path, digest: str) -> Path:
    """Where the blob with sha256 ``digest`` is stored."""
    return blob_dir / digest[:2] / digest


def store_blob(blob_dir: Path, data: bytes) -> str:
    """Write ``data`` under its sha256 (content-addressed), durably; return the digest."""
    digest = hashlib.sha256(data).hexdigest()
    target = blob_path(blob_dir, digest)
    if target.exists():
        return digest
    target.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(target, data)
    return digest


def read_blob(blob_dir: Path, digest: str) -> bytes:
    """The stored bytes of blob ``digest``: every reader of study bytes goes through here."""
    return blob_path(blob_dir, digest).read_bytes()


def write_atomically(target: Path, data: bytes, *, exclusive: bool = False, mode: int = 0o666) -> None:
    """Write ``data`` to ``target`` all or nothing, durably.

    The bytes go to a temporary file in the same directory, which is fsynced, then renamed
    over ``target``; the directory is fsynced too, or the rename itself may be lost in a
    crash.

    Args:
        exclusive: never replace an existing ``target`` (two processes creating the same
            file: the first one wins, the second gets :class:`FileExistsError`).
        mode: permissions of the new file (before the umask).

    Raises:
        FileExistsError: ``exclusive`` and ``target`` exists.
    """
    tmp = target.with_name(f"{target.name}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if exclusive:
            os.link(tmp, target)  # fails if target exists, unlike a rename
        else:
            os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_directory(target.parent)


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
