"""Pairing: a small private CA and one certificate per unit, and the TLS contexts of the journey link.

`pair(dir, remote_name, source_ids)` (behind `usbmirror pair`) writes into DIR::

    ca.crt  ca.key                       the private CA (keep ca.key off the units)
    remote-<NAME>.crt  remote-<NAME>.key the remote unit's identity
    source-<ID>.crt    source-<ID>.key   one per source (local) unit

A unit needs `ca.crt` plus its own certificate and key. The unit identity is in the certificate
subject CN (`source:<ID>` / `remote:<NAME>`) and in a SAN URI (`usbmirror:source:<ID>`); the
remote unit lets a connection write only to the target of the source id its certificate names.

The contexts allow TLS 1.3 only and require a certificate on both ends, signed by the pairing CA.
Host names are not checked (units are addressed by IP on private links); the unit identity in the
certificate is checked instead, by `peer_identity()`.
"""

from __future__ import annotations

import datetime
import os
import re
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from firmware.identity import write_atomically

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
VALID_DAYS = 3650


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

    @classmethod
    def for_source(cls, tls_dir: str | os.PathLike[str], source_id: str) -> TlsFiles:
        d = Path(tls_dir)
        return cls(d / "ca.crt", d / f"source-{source_id}.crt", d / f"source-{source_id}.key")

    @classmethod
    def for_remote(cls, tls_dir: str | os.PathLike[str], name: str) -> TlsFiles:
        d = Path(tls_dir)
        return cls(d / "ca.crt", d / f"remote-{name}.crt", d / f"remote-{name}.key")

    def check(self) -> None:
        for p in (self.ca, self.cert, self.key):
            if not p.is_file():
                raise PairingError(f"TLS file {p} is missing (make it with `usbmirror pair`)")


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_ca(common_name: str = "usbmirror pairing CA") -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
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


def pair(directory: str | os.PathLike[str], remote_name: str, source_ids: list[str]) -> list[Path]:
    """Create (or extend) a pairing directory; returns the files written.

    An existing CA in the directory is reused, so more sources can be added later; existing unit
    files are left alone.
    """
    check_unit_id(remote_name)
    for s in source_ids:
        check_unit_id(s)
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    ca_crt, ca_key_path = d / "ca.crt", d / "ca.key"
    if ca_crt.exists() and ca_key_path.exists():
        ca_cert = x509.load_pem_x509_certificate(ca_crt.read_bytes())
        loaded = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
        if not isinstance(loaded, ec.EllipticCurvePrivateKey):
            raise PairingError(f"{ca_key_path} is not an EC key")
        ca_key = loaded
    else:
        ca_cert, ca_key = make_ca()
        write_atomically(ca_key_path, _key_pem(ca_key), 0o600)
        write_atomically(ca_crt, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
        written += [ca_crt, ca_key_path]
    units = [("remote", remote_name)] + [("source", s) for s in source_ids]
    for role, uid in units:
        crt, key_path = d / f"{role}-{uid}.crt", d / f"{role}-{uid}.key"
        if crt.exists() and key_path.exists():
            continue
        cert, key = make_unit_cert(ca_cert, ca_key, role, uid)
        write_atomically(key_path, _key_pem(key), 0o600)
        write_atomically(crt, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        written += [crt, key_path]
    return written


def _context(purpose: ssl.Purpose, files: TlsFiles) -> ssl.SSLContext:
    files.check()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if purpose is ssl.Purpose.CLIENT_AUTH else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # identity is the unit name in the certificate, checked by the caller
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=str(files.ca))
    ctx.load_cert_chain(certfile=str(files.cert), keyfile=str(files.key))
    return ctx


def server_context(files: TlsFiles) -> ssl.SSLContext:
    """For the remote unit: TLS 1.3 only, client certificate required and checked against the CA."""
    return _context(ssl.Purpose.CLIENT_AUTH, files)


def client_context(files: TlsFiles) -> ssl.SSLContext:
    """For the local unit: TLS 1.3 only, presents its certificate, checks the remote's against the CA."""
    return _context(ssl.Purpose.SERVER_AUTH, files)


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
