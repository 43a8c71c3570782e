"""DICOM TLS: the contexts of the BCP 195 profile, and certificates for a test or a pilot.

DICOM's secure transport (PS3.15 Annex B) asks for the BCP 195 profile: TLS 1.2 at least (1.3
preferred, which Python negotiates when both sides have it), and on TLS 1.2 only ECDHE key
exchange with AES-GCM. Both sides authenticate with X.509 certificates; a hospital's own CA
signs them. ``write_self_signed`` makes such a CA and a server and a client certificate, for
a test or a pilot before the hospital's PKI issues real ones.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from radlens.config import TlsSettings
from radlens.errors import ConfigError

# TLS 1.2 suites of BCP 195 (RFC 9325 §4.2): forward secrecy (ECDHE), authenticated
# encryption (AES-GCM). TLS 1.3's own suites are all AEAD and stay at OpenSSL's defaults.
BCP195_TLS12_CIPHERS = ":".join([
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
])


def _harden(context: ssl.SSLContext) -> ssl.SSLContext:
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(BCP195_TLS12_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    return context


def _load(action: str, path: Path, load: object, *args: object) -> None:
    """Run a context loader, turning a missing or unreadable file into a ConfigError."""
    try:
        load(*args)  # type: ignore[operator]
    except FileNotFoundError:
        raise ConfigError(f"{action}: {path} does not exist") from None
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"{action}: cannot use {path}: {exc}") from None


def server_context(tls: TlsSettings) -> ssl.SSLContext:
    """The listener's context: our certificate, and the CA a sender's certificate must chain
    to (required unless ``require_client_certificate`` is off)."""
    if tls.certificate is None or tls.private_key is None:
        raise ConfigError("dicom.tls: a TLS listener needs certificate and private_key")
    context = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    _load("dicom.tls.certificate", tls.certificate, context.load_cert_chain,
          str(tls.certificate), str(tls.private_key))
    if tls.ca_certificates is not None:
        _load("dicom.tls.ca_certificates", tls.ca_certificates, context.load_verify_locations,
              str(tls.ca_certificates))
    if tls.require_client_certificate:
        context.verify_mode = ssl.CERT_REQUIRED
    elif tls.ca_certificates is not None:
        context.verify_mode = ssl.CERT_OPTIONAL
    return context


def client_context(tls: TlsSettings, ca_certificates: Path | None = None, *,
                   check_hostname: bool = True) -> ssl.SSLContext:
    """A context for sending to a TLS destination: we trust ``ca_certificates`` (default: the
    node's dicom.tls.ca_certificates, else the system's CAs) and show our certificate when we
    have one."""
    context = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    context.check_hostname = check_hostname
    trust = ca_certificates or tls.ca_certificates
    if trust is not None:
        _load("tls_ca_certificates", trust, context.load_verify_locations, str(trust))
    else:
        context.load_default_certs()
    if tls.certificate is not None and tls.private_key is not None:
        _load("dicom.tls.certificate", tls.certificate, context.load_cert_chain,
              str(tls.certificate), str(tls.private_key))
    return context


def describe_peer(tls_socket: ssl.SSLSocket) -> dict[str, str | None]:
    """What the audit trail keeps of a TLS connection: version, cipher, the peer's subject."""
    cipher = tls_socket.cipher()
    certificate = tls_socket.getpeercert()
    subject = None
    if certificate:
        subject = ",".join("=".join(pair) for rdn in certificate.get("subject", ())
                           for pair in rdn)
    return {"tls_version": tls_socket.version(), "cipher": cipher[0] if cipher else None,
            "client_certificate": subject}


# -- certificates for a test or a pilot ------------------------------------------------------
@dataclass(frozen=True)
class SelfSignedFiles:
    ca_certificate: Path
    server_certificate: Path
    server_key: Path
    client_certificate: Path
    client_key: Path


def write_self_signed(out: Path, *, hostnames: Sequence[str] = (), days: int = 825,
                      organisation: str = "radlens pilot") -> SelfSignedFiles:
    """Write ca.crt, server.crt/.key and client.crt/.key (PEM, ECDSA P-256) into ``out``.

    The server certificate names localhost, 127.0.0.1, ::1, this machine's name and
    ``hostnames``; both certificates may serve and call (serverAuth and clientAuth), since a
    node listens and also sends to destinations. Keys are written readable by the owner only.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)

    def name(common_name: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, organisation),
                          x509.NameAttribute(NameOID.COMMON_NAME, common_name)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = name(f"{organisation} CA")
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(
                   digital_signature=False, content_commitment=False, key_encipherment=False,
                   data_encipherment=False, key_agreement=False, key_cert_sign=True,
                   crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                              critical=False)
               .sign(ca_key, hashes.SHA256()))

    names: list[x509.GeneralName] = []
    for host in ["localhost", socket.gethostname(), *hostnames]:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    names += [x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
              x509.IPAddress(ipaddress.ip_address("::1"))]
    unique = list(dict.fromkeys(names))

    def issue(common_name: str, alternative: list[x509.GeneralName]) -> tuple[bytes, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder().subject_name(name(common_name))
                   .issuer_name(ca_name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now)
                   .not_valid_after(now + datetime.timedelta(days=days))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None),
                                  critical=True)
                   .add_extension(x509.KeyUsage(
                       digital_signature=True, content_commitment=False,
                       key_encipherment=False, data_encipherment=False, key_agreement=True,
                       key_cert_sign=False, crl_sign=False, encipher_only=False,
                       decipher_only=False), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                         ExtendedKeyUsageOID.CLIENT_AUTH]),
                                  critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                       ca_key.public_key()), critical=False))
        if alternative:
            builder = builder.add_extension(x509.SubjectAlternativeName(alternative),
                                            critical=False)
        certificate = builder.sign(ca_key, hashes.SHA256())
        key_pem = key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.TraditionalOpenSSL,
                                    serialization.NoEncryption())
        return certificate.public_bytes(serialization.Encoding.PEM), key_pem

    server_pem, server_key = issue(f"{organisation} server", unique)
    client_pem, client_key = issue(f"{organisation} client", [])
    files = SelfSignedFiles(out / "ca.crt", out / "server.crt", out / "server.key",
                            out / "client.crt", out / "client.key")
    files.ca_certificate.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.server_certificate.write_bytes(server_pem)
    files.client_certificate.write_bytes(client_pem)
    for path, content in ((files.server_key, server_key), (files.client_key, client_key)):
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(content)
    return files
