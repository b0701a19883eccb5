"""Who may send studies by DICOM (peers per clinic) and where each clinic's results go (its PACS)."""

from __future__ import annotations

import ipaddress
import re
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from triage_api import auth
from triage_api.auth import Principal, Role
from triage_api.errors import InvalidRequest, NotFound
from triage_api.tables import Clinic, DicomPeer, PacsDestination

_AE_TITLE = re.compile(r"^[\x21-\x5b\x5d-\x7e]([\x20-\x5b\x5d-\x7e]{0,14}[\x21-\x5b\x5d-\x7e])?$")
"""PS3.5 AE title: 1-16 characters of the default repertoire, no backslash, no control
characters, not only spaces (leading and trailing spaces are not significant)."""


def ae_title(value: str) -> str:
    """A valid AE title, stripped.

    Raises:
        InvalidRequest: empty, too long, or with characters an AE title may not hold.
    """
    stripped = value.strip()
    if not _AE_TITLE.match(stripped):
        raise InvalidRequest("an AE title is 1 to 16 printable ASCII characters without a backslash")
    return stripped


def _address(value: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise InvalidRequest(
            "a peer's host is an IP address (the address the association comes from)"
        ) from None


def _clinic(session: Session, name: str) -> Clinic:
    clinic = session.execute(select(Clinic).where(Clinic.name == name)).scalar_one_or_none()
    if clinic is None:
        raise NotFound("no such clinic")
    return clinic


def add_peer(session: Session, *, clinic: str, ae: str, host: str | None, now: datetime) -> DicomPeer:
    """Allow ``ae`` (from ``host``, or any address) to send studies for ``clinic``.

    A service user (uploader role, that clinic only) is created for the peer: studies it
    sends are recorded as uploaded by it.

    Raises:
        NotFound: no such clinic.
        InvalidRequest: a malformed AE title or address.
    """
    title = ae_title(ae)
    address = None if host is None else _address(host)
    row = _clinic(session, clinic)
    name = f"dicom:{title}@{address or '*'}"
    user, _key = auth.add_user(session, name=name, role=Role.UPLOADER, clinics=[row.name])
    peer = DicomPeer(clinic_id=row.id, ae_title=title, host=address, user_id=user.id, created_at=now)
    session.add(peer)
    session.flush()
    return peer


def find_peer(session: Session, *, ae: str, host: str) -> DicomPeer | None:
    """The peer an association from ``ae`` at ``host`` belongs to; one bound to the address wins."""
    rows = session.execute(select(DicomPeer).where(DicomPeer.ae_title == ae.strip())).scalars().all()
    bound = [peer for peer in rows if peer.host == host]
    anywhere = [peer for peer in rows if peer.host is None]
    matches = bound or anywhere
    return matches[0] if matches else None


def peer_principal(peer: DicomPeer) -> Principal:
    """The caller a peer's studies are accepted as: its service user, for its one clinic."""
    return Principal(peer.user_id, Role.UPLOADER, frozenset({peer.clinic_id}))


def set_pacs(
    session: Session, *, clinic: str, ae: str, host: str, port: int, now: datetime
) -> PacsDestination:
    """Send ``clinic``'s AI results to the PACS at ``ae``/``host``:``port`` (replacing any other).

    Raises:
        NotFound: no such clinic.
        InvalidRequest: a malformed AE title, host or port.
    """
    title = ae_title(ae)
    if not 0 < port < 65536:
        raise InvalidRequest("a port is between 1 and 65535")
    if not re.match(r"^[A-Za-z0-9.:-]{1,255}$", host):
        raise InvalidRequest("a host is a name or an IP address")
    row = _clinic(session, clinic)
    destination = session.get(PacsDestination, row.id)
    if destination is None:
        destination = PacsDestination(clinic_id=row.id, ae_title=title, host=host, port=port, updated_at=now)
        session.add(destination)
    else:
        destination.ae_title, destination.host, destination.port = title, host, port
        destination.updated_at = now
    return destination
