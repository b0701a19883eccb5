"""The Ed25519 key that signs audit checkpoints, kept in a file outside the database.

The private key is a PKCS#8 PEM file created with mode 0600 on first use. Whoever can read
it can forge checkpoints, so it belongs outside the database and its backups; the public
key (``triage audit public-key``) is what an auditor keeps elsewhere to verify with.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey


class AuditKeyError(Exception):
    """The signing or verifying key is missing, unreadable, malformed or too widely readable."""


def load_or_create_signing_key(path: Path) -> Ed25519PrivateKey:
    """Read the signing key at ``path``, creating it (mode 0600, parent 0700) if absent.

    Creation uses ``O_EXCL``, so two processes starting together end up with the same key.

    Args:
        path: the private key file.

    Returns:
        The private key.

    Raises:
        AuditKeyError: the file is not an Ed25519 PEM private key, or group/others may read it.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return load_signing_key(path)
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
        fh.flush()
        os.fsync(fh.fileno())
    return load_signing_key(path)


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    """Read an existing signing key; never creates one.

    Args:
        path: the private key file.

    Returns:
        The private key.

    Raises:
        AuditKeyError: missing, group/other-readable, or not an Ed25519 PEM private key.
    """
    try:
        mode = path.stat().st_mode
        data = path.read_bytes()
    except OSError as exc:
        raise AuditKeyError(f"cannot read the audit signing key {path} ({type(exc).__name__})") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise AuditKeyError(
            f"the audit signing key {path} must not be accessible to group/others (chmod 600)"
        )
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise AuditKeyError(f"{path} is not a PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise AuditKeyError(f"{path} is not an Ed25519 key")
    return key


def public_key_pem(key: Ed25519PublicKey) -> str:
    """The public key as SubjectPublicKeyInfo PEM text (what ``verify --public-key`` reads).

    Args:
        key: the public key.

    Returns:
        PEM text.
    """
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Read a public key exported by ``public_key_pem``.

    Args:
        path: a PEM file.

    Returns:
        The public key.

    Raises:
        AuditKeyError: unreadable, or not an Ed25519 PEM public key.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise AuditKeyError(f"cannot read the public key {path} ({type(exc).__name__})") from None
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError):
        raise AuditKeyError(f"{path} is not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise AuditKeyError(f"{path} is not an Ed25519 public key")
    return key


def key_id(key: Ed25519PublicKey) -> str:
    """A stable name for a public key: sha256 of its 32 raw bytes, hex.

    Args:
        key: the public key.

    Returns:
        64 hex characters.
    """
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()
