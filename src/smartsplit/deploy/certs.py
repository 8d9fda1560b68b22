"""A private certificate authority for mutual TLS between the central server, the edge servers and the devices.

``write_certs(folder, devices=N, edges=M)`` fills a folder like this::

    ca.pem  ca.key              the authority: a self-signed certificate and its private key
    server.pem  server.key      the central server
    edge-0.pem  edge-0.key      edge server 0 ... edge-{M-1}
    device-0.pem  device-0.key  device 0 ... device-{N-1}

Every ``.pem`` is a PEM certificate signed by ``ca.pem``; every ``.key`` is an unencrypted PKCS8 PEM EC P-256 key,
readable by its owner only (mode 0o600). Keep ``ca.key`` away from the machines: only ``issue`` needs it.

A party's *identity* is the common name of its certificate's subject, exactly ``server``, ``edge-<i>`` or
``device-<i>`` (``identity_of`` parses it), and its certificate is good for its role only:

- a device's for client authentication only: its key cannot serve anyone as an edge or a server;
- an edge's for both (it serves its devices and calls the server), naming ``smartsplit-edge`` and every host it
  may listen on (``hosts``) in its subjectAltName;
- the server's for server authentication only, naming ``smartsplit-server`` and the hosts.

A device checks that what it reached is an edge (the TLS name it expects is ``smartsplit-edge``), an edge that
what it reached is the server (``smartsplit-server``); the server and the edges check the caller's identity. A process proves who it is with ``load_identity(folder, name)``, which holds its key, its
certificate and the authority that all peers trust. A second, unrelated authority is just another folder.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from smartsplit.errors import SmartSplitError

try:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
except ImportError as error:  # pragma: no cover - depends on the environment
    raise SmartSplitError(
        f"certificates need the 'cryptography' package ({error}); install it with: pip install cryptography"
    ) from error

DEFAULT_HOSTS = ("localhost", "127.0.0.1")
_AUTHORITY = "ca"
_SKEW = datetime.timedelta(minutes=5)  # certificates start a little early, for clocks that lag behind
_HOW = "make one with: smartsplit certs DIR --devices N --edges M"
_NAME = re.compile(r"(server)|(edge|device)-(0|[1-9][0-9]*)")


@dataclass(frozen=True)
class Identity:
    """What one party needs for mutual TLS, as PEM bytes: its key, its certificate and the authority it trusts."""

    name: str
    key: bytes
    certificate: bytes
    authority: bytes


def identity_of(common_name: str) -> tuple[str, int | None]:
    """``"server"`` -> ``("server", None)``, ``"edge-3"`` -> ``("edge", 3)``, ``"device-17"`` -> ``("device", 17)``."""
    match = _NAME.fullmatch(common_name)
    if match is None:
        raise SmartSplitError(
            f"{common_name!r} is not an identity: expected 'server', 'edge-<i>' or 'device-<i>' (e.g. 'device-17')"
        )
    if match.group(1):
        return "server", None
    return match.group(2), int(match.group(3))


def write_certs(
    folder: str | os.PathLike,
    devices: int,
    edges: int,
    hosts: Sequence[str] = DEFAULT_HOSTS,
    days: int = 365,
    *,
    overwrite: bool = False,
) -> list[Path]:
    """Make a new authority in ``folder`` and certificates for ``server``, ``edge-0..`` and ``device-0..``.

    Refuses a folder that already holds an authority unless ``overwrite``. Returns the paths written.
    """
    if devices < 0 or edges < 0:
        raise SmartSplitError(f"--devices and --edges must be 0 or more, not {devices} and {edges}")
    if not hosts:
        raise SmartSplitError("certificates need at least one host name or address to name")
    _check_days(days)
    folder = Path(folder)
    if (folder / f"{_AUTHORITY}.pem").exists() and not overwrite:
        raise SmartSplitError(
            f"{folder / (_AUTHORITY + '.pem')} already exists: choose another folder or pass overwrite "
            "(certificates from the old authority stop working)"
        )
    folder.mkdir(parents=True, exist_ok=True)
    written = list(new_authority(folder, days=days))
    names = ["server"] + [f"edge-{i}" for i in range(edges)] + [f"device-{i}" for i in range(devices)]
    for name in names:
        written.extend(issue(folder, name, days=days, hosts=hosts))
    return written


def new_authority(folder: str | os.PathLike, *, days: int = 365) -> tuple[Path, Path]:
    """Write a fresh self-signed authority, ``ca.pem`` and ``ca.key``, into ``folder`` (which must exist)."""
    _check_days(days)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = _subject("smartsplit certificate authority")
    start = _now() - _SKEW
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _write_pair(Path(folder), _AUTHORITY, key, certificate)


def issue(
    folder: str | os.PathLike,
    name: str,
    *,
    days: int = 365,
    not_before: datetime.datetime | None = None,
    hosts: Sequence[str] = DEFAULT_HOSTS,
) -> tuple[Path, Path]:
    """Sign a new key for ``name`` with the authority in ``folder``; write and return ``<name>.pem``, ``<name>.key``.

    The certificate is valid from ``not_before`` (default: now) for ``days`` days, so a ``not_before`` far enough in
    the past makes one that has already expired (a ``not_before`` without a time zone is taken as UTC).
    """
    role, _ = identity_of(name)
    _check_days(days)
    hosts = (hosts,) if isinstance(hosts, str) else tuple(hosts)
    if not hosts:
        raise SmartSplitError("certificates need at least one host name or address to name")
    folder = Path(folder)
    authority_key = serialization.load_pem_private_key(_read(folder / f"{_AUTHORITY}.key"), password=None)
    authority = x509.load_pem_x509_certificate(_read(folder / f"{_AUTHORITY}.pem"))
    key = ec.generate_private_key(ec.SECP256R1())
    start = _now() - _SKEW if not_before is None else _utc(not_before)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(_subject(name))
        .issuer_name(authority.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage(_USAGES[role]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(authority.public_key()), critical=False
        )
    )
    if role != "device":
        names = [x509.DNSName(tls_name(role)), *(_general_name(host) for host in hosts)]
        certificate = certificate.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return _write_pair(folder, name, key, certificate.sign(authority_key, hashes.SHA256()))


_USAGES = {
    "device": [ExtendedKeyUsageOID.CLIENT_AUTH],
    "edge": [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
    "server": [ExtendedKeyUsageOID.SERVER_AUTH],
}


def tls_name(role: str) -> str:
    """The name a peer of ``role`` ("edge" or "server") proves in TLS, whatever host it is reached at."""
    return f"smartsplit-{role}"


def load_identity(folder: str | os.PathLike, name: str) -> Identity:
    """Read ``<name>.key``, ``<name>.pem`` and ``ca.pem`` from ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SmartSplitError(f"certificate folder {folder} does not exist; {_HOW}")
    return Identity(
        name=name,
        key=_read(folder / f"{name}.key"),
        certificate=_read(folder / f"{name}.pem"),
        authority=_read(folder / f"{_AUTHORITY}.pem"),
    )


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise SmartSplitError(f"{path} is missing; {_HOW}") from None


def _write_pair(
    folder: Path, name: str, key: ec.EllipticCurvePrivateKey, certificate: x509.Certificate
) -> tuple[Path, Path]:
    key_path, certificate_path = folder / f"{name}.key", folder / f"{name}.pem"
    pem_key = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    descriptor = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(descriptor, 0o600)  # an existing file keeps its old mode through os.open
    with os.fdopen(descriptor, "wb") as file:
        file.write(pem_key)
    certificate_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return certificate_path, key_path


def _subject(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _key_usage(*, digital_signature: bool = False, key_cert_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=key_cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _check_days(days: int) -> None:
    if days < 1:
        raise SmartSplitError(f"certificates must be valid for at least 1 day, not {days}")


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _utc(moment: datetime.datetime) -> datetime.datetime:
    return moment.replace(tzinfo=datetime.timezone.utc) if moment.tzinfo is None else moment
