"""Pairing: a small private CA and one certificate per unit, and the TLS contexts of the journey link.

`pair(dir, remote_names, source_ids)` (behind `usbmirror pair`) writes into DIR::

    ca.crt  ca.key                       the private CA (keep ca.key off the units)
    remote-<NAME>.crt  remote-<NAME>.key each remote unit's identity (one per `--remote`)
    source-<ID>.crt    source-<ID>.key   one per source (local) unit
    crl.pem                              the revocation list (after the first `--revoke`)

A unit needs `ca.crt` plus its own certificate and key, and `crl.pem` once one exists. The unit
identity is in the certificate subject CN (`source:<ID>` / `remote:<NAME>`) and in a SAN URI
(`usbmirror:source:<ID>`); a remote unit lets a source certificate write only to the target of the
source id it names, and a remote certificate of the same CA (a relay, docs/REPLICATION.md "Cascade")
write the targets of the sources it relays.

The contexts allow TLS 1.3 only and require a certificate on both ends, signed by the pairing CA.
Host names are not checked (units are addressed by IP on private links); the unit identity in the
certificate is checked instead, by `peer_identity()`.

Revocation and renewal: `revoke(dir, name)` adds the unit's current certificate to `crl.pem` (signed by
the CA); `renew(dir, name)` issues it a fresh key and certificate. The contexts made here are
`PairingContext`s: before every handshake they look at the TLS files on disk (one `stat` each) and
rebuild themselves when one changed, so a CRL (or a renewed certificate) copied onto a running unit
takes effect at its next handshake, without a restart. `expiry_report(files, now)` gives the
`cert_expires` and `warnings` status keys (a warning from 30 days before a certificate or the CRL
runs out).

`cryptography` is imported only inside the functions that need it (provisioning, CRL checks, expiry
reports): a local unit without remotes, such as a board's first boot, runs without the package.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import socket
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from firmware.atomic import write_atomically

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

log = logging.getLogger(__name__)

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
VALID_DAYS = 3650
CRL_FILE = "crl.pem"
EXPIRY_WARNING_DAYS = 30


class PairingError(Exception):
    """Bad unit names or missing/unreadable TLS files."""


def check_unit_id(name: str) -> str:
    if not _ID_RE.match(name):
        raise PairingError(f"unit id {name!r}: use 1-64 letters, digits, '.', '_' or '-'")
    return name


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """Paths of the CA certificate and this unit's certificate and key."""

    ca: Path
    cert: Path
    key: Path
    crl: Path | None = None  # checked when the file exists (a unit paired before any revocation has none)

    @classmethod
    def for_source(cls, tls_dir: str | os.PathLike[str], source_id: str) -> TlsFiles:
        d = Path(tls_dir)
        return cls(d / "ca.crt", d / f"source-{source_id}.crt", d / f"source-{source_id}.key", d / CRL_FILE)

    @classmethod
    def for_remote(cls, tls_dir: str | os.PathLike[str], name: str) -> TlsFiles:
        d = Path(tls_dir)
        return cls(d / "ca.crt", d / f"remote-{name}.crt", d / f"remote-{name}.key", d / CRL_FILE)

    def check(self) -> None:
        for p in (self.ca, self.cert, self.key):
            if not p.is_file():
                raise PairingError(f"TLS file {p} is missing (make it with `usbmirror pair`)")


def _key() -> ec.EllipticCurvePrivateKey:
    from cryptography.hazmat.primitives.asymmetric import ec
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_ca(common_name: str = "usbmirror pairing CA") -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID
    key = _key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def make_unit_cert(ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, role: str, unit_id: str
                   ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A certificate naming one unit: CN `role:unit_id`, SAN URI `usbmirror:role:unit_id`."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    check_unit_id(unit_id)
    key = _key()
    now = datetime.datetime.now(datetime.UTC)
    ident = f"{role}:{unit_id}"
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ident)]))
        .issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"usbmirror:{ident}")]),
                       critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def pair(directory: str | os.PathLike[str], remote_names: str | list[str], source_ids: list[str]) -> list[Path]:
    """Create (or extend) a pairing directory for one remote or several (a cascade: each relay
    authenticates to the next remote with its own certificate); returns the files written.

    An existing CA in the directory is reused, so more sources can be added later; existing unit
    files are left alone.
    """
    from cryptography.hazmat.primitives import serialization
    remotes = [remote_names] if isinstance(remote_names, str) else list(remote_names)
    if not remotes:
        raise PairingError("at least one remote unit is needed")
    for r in remotes:
        check_unit_id(r)
    for s in source_ids:
        check_unit_id(s)
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    ca_crt, ca_key_path = d / "ca.crt", d / "ca.key"
    if ca_crt.exists() and ca_key_path.exists():
        ca_cert, ca_key = _load_ca(d)
    else:
        ca_cert, ca_key = make_ca()
        write_atomically(ca_key_path, _key_pem(ca_key), 0o600)
        write_atomically(ca_crt, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
        written += [ca_crt, ca_key_path]
    units = [("remote", r) for r in dict.fromkeys(remotes)] + [("source", s) for s in source_ids]
    for role, uid in units:
        crt, key_path = d / f"{role}-{uid}.crt", d / f"{role}-{uid}.key"
        if crt.exists() and key_path.exists():
            continue
        cert, key = make_unit_cert(ca_cert, ca_key, role, uid)
        write_atomically(key_path, _key_pem(key), 0o600)
        write_atomically(crt, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        written += [crt, key_path]
    return written


def _load_ca(d: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    ca_crt, ca_key_path = d / "ca.crt", d / "ca.key"
    if not (ca_crt.is_file() and ca_key_path.is_file()):
        raise PairingError(f"{d} holds no pairing CA (ca.crt and ca.key); make one with `usbmirror pair`")
    try:
        ca_cert = x509.load_pem_x509_certificate(ca_crt.read_bytes())
        loaded = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
    except ValueError as exc:
        raise PairingError(f"the CA in {d} is unreadable: {exc}") from exc
    if not isinstance(loaded, ec.EllipticCurvePrivateKey):
        raise PairingError(f"{ca_key_path} is not an EC key")
    return ca_cert, loaded


def _unit_files(d: Path, name: str) -> tuple[str, str, Path, Path]:
    """(role, unit id, certificate, key) of the unit NAME (or `remote:NAME` / `source:NAME`) in DIR."""
    role, sep, uid = name.partition(":")
    if sep:
        if role not in ("remote", "source"):
            raise PairingError(f"unit {name!r}: the role before ':' is remote or source")
        roles = [role]
    else:
        roles, uid = ["remote", "source"], name
    check_unit_id(uid)
    found = [r for r in roles if (d / f"{r}-{uid}.crt").is_file()]
    if not found:
        raise PairingError(f"no certificate for unit {name!r} in {d} (looked for "
                           + " and ".join(f"{r}-{uid}.crt" for r in roles) + ")")
    if len(found) > 1:
        raise PairingError(f"both a remote and a source are named {uid!r} in {d}: say remote:{uid} or source:{uid}")
    r = found[0]
    return r, uid, d / f"{r}-{uid}.crt", d / f"{r}-{uid}.key"


def _load_crl(path: Path) -> x509.CertificateRevocationList | None:
    from cryptography import x509
    if not path.exists():
        return None
    try:
        return x509.load_pem_x509_crl(path.read_bytes())
    except ValueError as exc:
        raise PairingError(f"{path} is not a readable CRL: {exc}") from exc


def revoke(directory: str | os.PathLike[str], name: str, *, now: datetime.datetime | None = None) -> Path:
    """Add the current certificate of unit NAME to DIR/crl.pem (kept entries stay); returns the CRL path.

    Copy the CRL into the TLS directory of every unit: from its next handshake, a remote refuses a
    revoked source and a source refuses a revoked remote.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    d = Path(directory)
    ca_cert, ca_key = _load_ca(d)
    _role, _uid, crt, _key_path = _unit_files(d, name)
    cert = x509.load_pem_x509_certificate(crt.read_bytes())
    now = now or datetime.datetime.now(datetime.UTC)
    crl_path = d / CRL_FILE
    old = _load_crl(crl_path)
    builder = (x509.CertificateRevocationListBuilder().issuer_name(ca_cert.subject)
               .last_update(now - datetime.timedelta(minutes=5))
               .next_update(max(ca_cert.not_valid_after_utc, now + datetime.timedelta(days=1))))
    serials: set[int] = set()
    for entry in old or []:
        serials.add(entry.serial_number)
        builder = builder.add_revoked_certificate(entry)
    if cert.serial_number not in serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(cert.serial_number).revocation_date(now).build())
    crl = builder.sign(ca_key, hashes.SHA256())
    write_atomically(crl_path, crl.public_bytes(serialization.Encoding.PEM), 0o644)
    return crl_path


def renew(directory: str | os.PathLike[str], name: str) -> list[Path]:
    """Issue unit NAME a fresh key and certificate (full validity from now); returns the files written.

    The previous certificate stays valid until it expires (or is revoked), so the unit keeps its link
    until the new files are copied onto it; it picks them up at its next handshake.
    """
    from cryptography.hazmat.primitives import serialization
    d = Path(directory)
    ca_cert, ca_key = _load_ca(d)
    role, uid, crt, key_path = _unit_files(d, name)
    cert, key = make_unit_cert(ca_cert, ca_key, role, uid)
    write_atomically(key_path, _key_pem(key), 0o600)
    write_atomically(crt, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return [crt, key_path]


def expiry_report(files: TlsFiles, now: datetime.datetime) -> dict[str, Any]:
    """`cert_expires` (ISO 8601, UTC) of this unit's certificate and `warnings` for everything that
    runs out within EXPIRY_WARNING_DAYS (the unit's certificate, the CA, the CRL's next update)."""
    from cryptography import x509
    out: dict[str, Any] = {"cert_expires": None, "warnings": []}
    warnings: list[str] = out["warnings"]
    horizon = now + datetime.timedelta(days=EXPIRY_WARNING_DAYS)

    def check(what: str, when: datetime.datetime) -> None:
        if when <= now:
            warnings.append(f"{what} expired on {when.isoformat()}")  # handshakes fail from then on
        elif when <= horizon:
            hint = {"certificate": ": renew it with `usbmirror pair DIR --renew NAME`",
                    "CRL": ": make a new one with `usbmirror pair DIR --revoke NAME`"}.get(what, "")
            warnings.append(f"{what} expires in {(when - now).days} days ({when.isoformat()}){hint}")

    for what, path in (("certificate", files.cert), ("CA certificate", files.ca)):
        try:
            c = x509.load_pem_x509_certificate(path.read_bytes())
        except (OSError, ValueError) as exc:
            warnings.append(f"{what} {path} unreadable: {exc}")
            continue
        if what == "certificate":
            out["cert_expires"] = c.not_valid_after_utc.isoformat()
        check(what, c.not_valid_after_utc)
    if files.crl is not None and files.crl.exists():
        try:
            crl = _load_crl(files.crl)
        except PairingError as exc:
            warnings.append(str(exc))
            crl = None
        if crl is not None and crl.next_update_utc is not None:
            check("CRL", crl.next_update_utc)
    return out


def add_expiry_status(st: dict[str, Any], files: TlsFiles) -> None:
    """Put `cert_expires` into a unit's status and append its expiry warnings to `warnings`."""
    rep = expiry_report(files, datetime.datetime.now(datetime.UTC))
    st["cert_expires"] = rep["cert_expires"]
    st.setdefault("warnings", []).extend(rep["warnings"])


def _file_stamp(files: TlsFiles) -> tuple[tuple[int, int, int, int] | None, ...]:
    out: list[tuple[int, int, int, int] | None] = []
    for p in (files.ca, files.cert, files.key, files.crl):
        try:
            st = os.stat(p) if p is not None else None
        except OSError:
            st = None
        out.append((st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns) if st is not None else None)
    return tuple(out)


def _configure(ctx: ssl.SSLContext, files: TlsFiles) -> None:
    files.check()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # identity is the unit name in the certificate, checked by the caller
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=str(files.ca))
    if files.crl is not None and files.crl.exists():
        _load_crl(files.crl)  # a precise error for a damaged file
        ctx.load_verify_locations(cafile=str(files.crl))
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    ctx.load_cert_chain(certfile=str(files.cert), keyfile=str(files.key))


class PairingContext(ssl.SSLContext):
    """An `ssl.SSLContext` for the journey link that follows its TLS files on disk.

    Every `wrap_socket()` first compares the files' stat stamps with those it was built from; when
    one changed (a new CRL, a renewed certificate) it builds a fresh inner context and hands the
    socket to it. A file that fails to load keeps the previous context (logged). Settings read from
    this object itself (versions, verify mode) are those of the first build.
    """

    files: TlsFiles
    _server: bool
    _inner: ssl.SSLContext
    _stamp: tuple[tuple[int, int, int, int] | None, ...]
    _lock: threading.Lock

    def __new__(cls, files: TlsFiles, server: bool) -> PairingContext:
        self = super().__new__(cls, ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
        return self

    def __init__(self, files: TlsFiles, server: bool) -> None:
        self.files = files
        self._server = server
        self._lock = threading.Lock()
        self._stamp = _file_stamp(files)
        _configure(self, files)
        self._inner = self._build()

    def _build(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if self._server else ssl.PROTOCOL_TLS_CLIENT)
        _configure(ctx, self.files)
        return ctx

    def current(self) -> ssl.SSLContext:
        """The inner context, rebuilt first if a TLS file changed on disk."""
        stamp = _file_stamp(self.files)
        with self._lock:
            if stamp != self._stamp:
                try:
                    self._inner = self._build()
                    log.info("TLS files reloaded cert=%s crl=%s", self.files.cert,
                             self.files.crl if self.files.crl is not None and self.files.crl.exists() else "none")
                except (OSError, ssl.SSLError, PairingError) as exc:
                    log.warning("TLS files changed but do not load, keeping the previous ones: %s", exc)
                self._stamp = stamp
            return self._inner

    def wrap_socket(self, sock: socket.socket, server_side: bool = False, do_handshake_on_connect: bool = True,
                    suppress_ragged_eofs: bool = True, server_hostname: str | bytes | None = None,
                    session: ssl.SSLSession | None = None) -> ssl.SSLSocket:
        return self.current().wrap_socket(sock, server_side=server_side,
                                          do_handshake_on_connect=do_handshake_on_connect,
                                          suppress_ragged_eofs=suppress_ragged_eofs,
                                          server_hostname=server_hostname, session=session)

    def wrap_bio(self, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO, server_side: bool = False,
                 server_hostname: str | bytes | None = None, session: ssl.SSLSession | None = None) -> ssl.SSLObject:
        return self.current().wrap_bio(incoming, outgoing, server_side=server_side,
                                       server_hostname=server_hostname, session=session)


def server_context(files: TlsFiles) -> ssl.SSLContext:
    """For the remote unit: TLS 1.3 only, client certificate required and checked against the CA and CRL."""
    return PairingContext(files, server=True)


def client_context(files: TlsFiles) -> ssl.SSLContext:
    """For the local unit: TLS 1.3 only, presents its certificate, checks the remote's against the CA and CRL."""
    return PairingContext(files, server=False)


def peer_identity(sock: ssl.SSLSocket) -> tuple[str, str] | None:
    """(role, unit id) from the verified peer certificate's subject CN, or None."""
    cert = sock.getpeercert()
    if not cert:
        return None
    for rdn in cert.get("subject", ()):
        for attr in rdn:
            key, value = attr[0], attr[1]
            if key == "commonName" and isinstance(value, str):
                role, sep, uid = value.partition(":")
                if sep and role in ("source", "remote") and uid:
                    return role, uid
    return None
