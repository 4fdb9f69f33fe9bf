"""Development certificates: a local CA, a server certificate and client certificates (for mTLS).

Made with ``cryptography`` (ECDSA P-256, SHA-256). For development and tests only; production
certificates come from the platform's PKI. Private keys (the CA's included, so that more client
certificates can be issued later with :func:`add_client_cert`) are written with mode 0600.

One CA serves both directions: ``server.pem`` for the gateway's HTTPS or a replica's (its SANs
name the hosts), ``client.pem`` / ``client-<name>.pem`` for whoever must prove who it is (the
gateway to an mTLS replica, a client to the gateway).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CLIENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True)
class DevCerts:
    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    ca_key: Path | None = None
    #: name -> (certificate, key) of each named client certificate
    clients: dict[str, tuple[Path, Path]] = field(default_factory=dict)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "skyfleet dev"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)


def _cert(subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey,
          signer: ec.EllipticCurvePrivateKey, days: int) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days)))


def _leaf(cn: str, usage: x509.ObjectIdentifier, ca_name: x509.Name, ca_key: ec.EllipticCurvePrivateKey,
          days: int, cert_path: Path, key_path: Path, sans: list[x509.GeneralName] | None = None) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (_cert(_name(cn), ca_name, key.public_key(), ca_key, days)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert_path.write_bytes(builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    _write_key(key_path, key)


def _client_paths(out: Path, name: str) -> tuple[Path, Path]:
    if not CLIENT_NAME.fullmatch(name):
        raise ValueError(f"client name {name!r}: use 1-64 letters, digits, '.', '_' or '-'")
    return out / f"client-{name}.pem", out / f"client-{name}.key"


def make_dev_certs(out: Path, *, hosts: tuple[str, ...] = ("localhost", "127.0.0.1", "::1"),
                   days: int = 365, clients: tuple[str, ...] = ()) -> DevCerts:
    """Write ca.pem/ca.key, server.pem/server.key, client.pem/client.key and client-<name>.pem/.key
    for each of ``clients`` (common name = the name) into ``out``."""
    client_paths = {name: _client_paths(out, name) for name in clients}
    out.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("skyfleet dev CA")
    ca = (_cert(ca_name, ca_name, ca_key.public_key(), ca_key, days)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    paths = DevCerts(out / "ca.pem", out / "server.pem", out / "server.key", out / "client.pem", out / "client.key",
                     ca_key=out / "ca.key", clients=client_paths)
    _leaf("skyfleet gateway", ExtendedKeyUsageOID.SERVER_AUTH, ca_name, ca_key, days, paths.server_cert,
          paths.server_key, sans)
    _leaf("skyfleet client", ExtendedKeyUsageOID.CLIENT_AUTH, ca_name, ca_key, days, paths.client_cert,
          paths.client_key)
    for name, (cert_path, key_path) in client_paths.items():
        _leaf(name, ExtendedKeyUsageOID.CLIENT_AUTH, ca_name, ca_key, days, cert_path, key_path)
    assert paths.ca_key is not None
    _write_key(paths.ca_key, ca_key)
    paths.ca_cert.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    return paths


def add_client_cert(out: Path, name: str, *, days: int = 365) -> tuple[Path, Path]:
    """Issue client-<name>.pem/.key from the CA already in ``out`` (ca.pem and ca.key)."""
    cert_path, key_path = _client_paths(out, name)
    try:
        ca = x509.load_pem_x509_certificate((out / "ca.pem").read_bytes())
        ca_key = serialization.load_pem_private_key((out / "ca.key").read_bytes(), password=None)
    except FileNotFoundError:
        raise FileNotFoundError(f"no CA in {out} (ca.pem and ca.key): run 'skyfleet certs dev' first") from None
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{out / 'ca.key'} is not an EC private key")
    _leaf(name, ExtendedKeyUsageOID.CLIENT_AUTH, ca.subject, ca_key, days, cert_path, key_path)
    return cert_path, key_path
