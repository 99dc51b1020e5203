"""The OPC UA server's certificate (engine.sinks.opcua): the one given, checked, or a self-signed one, kept.

Clients trust a server certificate by its SHA-1 thumbprint, so the self-signed one is made rarely: at the first
secured run, and again only when it is missing, unreadable, about to expire, or made for another application URI
(the host was renamed). Its key is written readable by its owner alone.
"""

from __future__ import annotations

import ipaddress
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

from engine.common.errors import UserError, one_line

__all__ = ["server_certificate", "default_certificate_dir", "thumbprint", "CERT_FILE", "KEY_FILE"]

CERT_DAYS = 5 * 365  # a self-signed certificate's validity
CERT_FILE, KEY_FILE = "server-cert.der", "server-key.pem"


def thumbprint(cert) -> str:
    """A certificate's SHA-1 thumbprint, hex (how OPC UA clients name a certificate they trust)."""
    import hashlib

    from cryptography.hazmat.primitives.serialization import Encoding
    return hashlib.sha1(cert.public_bytes(Encoding.DER)).hexdigest()


def default_certificate_dir() -> Path:
    """Where the self-signed server certificate is kept: $XDG_CONFIG_HOME/lineflow/opcua (~/.config/...)."""
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "lineflow" / "opcua"


def _read_pem_or_der(path: Path, what: str, pem_loader, der_loader):
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"{what} {path}: cannot read it ({e.strerror})") from None
    try:
        return pem_loader(data) if data.lstrip().startswith(b"-----BEGIN") else der_loader(data)
    except (ValueError, TypeError) as e:  # not a certificate or key; an encrypted key (TypeError: no password)
        raise UserError(f"{what} {path}: not a usable PEM or DER file ({one_line(e)})") from None


def _uri_names(cert) -> list[str]:
    from cryptography import x509
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return san.get_values_for_type(x509.UniformResourceIdentifier)


def _make_certificate(key, app_uri: str, hosts: list[str]):
    """A self-signed OPC UA application instance certificate (OPC 10000-6 6.2.2): the application URI and the host
    names in its subject alternative names, usable for signing and encryption, client and server."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(app_uri)]
    for host in dict.fromkeys(hosts):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lineflow"),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, "lineflow")])
    now = datetime.now(UTC)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=CERT_DAYS))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=True, key_encipherment=True,
                                         data_encipherment=True, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))


def server_certificate(cert_file: str | Path | None, key_file: str | Path | None, folder: Path, app_uri: str,
                       hosts: list[str]) -> tuple:
    """(certificate, private key, application URI, where, made): the given pair (checked: readable, matching, valid
    now; the application URI is the certificate's), or the self-signed pair kept in `folder`, made anew when absent,
    expired within a day, or made for another application URI (another host name)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    now = datetime.now(UTC)
    if cert_file is not None or key_file is not None:
        if cert_file is None or key_file is None:
            raise UserError("--opcua-cert and --opcua-key go together (the server's certificate and its private key)")
        cert = _read_pem_or_der(Path(cert_file), "--opcua-cert", x509.load_pem_x509_certificate,
                                x509.load_der_x509_certificate)
        key = _read_pem_or_der(Path(key_file), "--opcua-key",
                               lambda d: serialization.load_pem_private_key(d, password=None),
                               lambda d: serialization.load_der_private_key(d, password=None))
        if not isinstance(key, rsa.RSAPrivateKey):
            raise UserError(f"--opcua-key {key_file}: Basic256Sha256 needs an RSA key")
        if key.public_key().public_numbers() != cert.public_key().public_numbers():
            raise UserError(f"--opcua-key {key_file}: not the private key of --opcua-cert {cert_file}")
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise UserError(f"--opcua-cert {cert_file}: valid only from {cert.not_valid_before_utc:%Y-%m-%d} to "
                            f"{cert.not_valid_after_utc:%Y-%m-%d}")
        uris = _uri_names(cert)
        return cert, key, uris[0] if uris else app_uri, Path(cert_file), False
    cert_path, key_path = folder / CERT_FILE, folder / KEY_FILE
    if cert_path.is_file() and key_path.is_file():
        try:
            cert = x509.load_der_x509_certificate(cert_path.read_bytes())
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            if (key.public_key().public_numbers() == cert.public_key().public_numbers()
                    and cert.not_valid_after_utc > now + timedelta(days=1) and app_uri in _uri_names(cert)):
                return cert, key, app_uri, cert_path, False
        except (OSError, ValueError, TypeError):
            pass  # unreadable or not ours: made anew below
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = _make_certificate(key, app_uri, hosts)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # the key readable by its owner only
        with os.fdopen(fd, "wb") as f:
            f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.DER))
    except OSError as e:
        raise UserError(f"--opcua: cannot keep the server's certificate in {folder} ({e.strerror}); give "
                        "--opcua-cert and --opcua-key") from None
    return cert, key, app_uri, cert_path, True
