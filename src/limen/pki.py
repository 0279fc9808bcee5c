"""Limen's internal CA: the service's server certificate and connector client certificates.

The CA and server key live in the store (table ``pki``) so every node of a cluster presents
the same certificate and trusts the same connectors.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from limen.errors import AuthError, ConfigError
from limen.store.models import PkiMaterial

if TYPE_CHECKING:
    from limen.config import Settings
    from limen.store.db import Store

CA_NAME = "ca"
SERVER_NAME = "server"
#: The OU that marks a connector certificate; the CN is the connector id.
CONNECTOR_OU = "limen-connector"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def cert_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def load_key(pem: str) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(pem.encode(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError("expected an EC private key")
    return key


def make_csr(key: ec.EllipticCurvePrivateKey, common_name: str) -> str:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def _san_entries(names: list[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    seen: set[str] = set()
    for name in names:
        if not name or name in seen:
            continue
        seen.add(name)
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            out.append(x509.DNSName(name))
    return out


@dataclass
class IssuedCert:
    cert_pem: str
    serial: str
    not_after: float


class Pki:
    def __init__(
        self,
        ca_cert: x509.Certificate,
        ca_key: ec.EllipticCurvePrivateKey,
        server_cert_pem: str,
        server_key_pem: str,
    ) -> None:
        self.ca_cert = ca_cert
        self._ca_key = ca_key
        self.ca_pem = cert_pem(ca_cert)
        self.server_cert_pem = server_cert_pem
        self.server_key_pem = server_key_pem

    @classmethod
    def load_or_create(cls, store: Store, settings: Settings) -> Pki:
        names = ["localhost", "127.0.0.1", "::1", settings.public_host, *settings.extra_san]
        with store.session() as s:
            ca_row = s.get(PkiMaterial, CA_NAME)
            if ca_row is None:
                ca_key = new_key()
                ca_cert = _self_signed_ca(ca_key)
                ca_row = PkiMaterial(
                    name=CA_NAME,
                    cert_pem=cert_pem(ca_cert),
                    key_pem=key_pem(ca_key),
                    created_at=time.time(),
                )
                s.add(ca_row)
            ca_cert = x509.load_pem_x509_certificate(ca_row.cert_pem.encode())
            ca_key = load_key(ca_row.key_pem)
            srv = s.get(PkiMaterial, SERVER_NAME)
            if srv is None or not _covers(srv.cert_pem, names):
                skey = new_key()
                scert = _issue(
                    ca_cert,
                    ca_key,
                    skey.public_key(),
                    settings.public_host,
                    ttl=825 * 86400,
                    sans=names,
                    server=True,
                )
                if srv is None:
                    srv = PkiMaterial(
                        name=SERVER_NAME, cert_pem="", key_pem="", created_at=time.time()
                    )
                    s.add(srv)
                srv.cert_pem = cert_pem(scert)
                srv.key_pem = key_pem(skey)
            return cls(ca_cert, ca_key, srv.cert_pem, srv.key_pem)

    def issue_connector_cert(self, csr_pem: str, connector_id: str, ttl: int) -> IssuedCert:
        """Sign a connector's CSR. The subject is ours (CN = connector id), whatever the CSR
        asked for: a connector cannot choose its own identity."""
        try:
            csr = x509.load_pem_x509_csr(csr_pem.encode())
        except ValueError as exc:
            raise ConfigError("the certificate request is not a PEM CSR") from exc
        if not csr.is_signature_valid:
            raise ConfigError("the certificate request's signature is invalid")
        cert = _issue(
            self.ca_cert,
            self._ca_key,
            csr.public_key(),
            connector_id,
            ttl=ttl,
            sans=[],
            server=False,
        )
        return IssuedCert(
            cert_pem(cert), format(cert.serial_number, "x"), cert.not_valid_after_utc.timestamp()
        )


def connector_id_from_cert(der: bytes) -> tuple[str, str]:
    """(connector id, serial hex) of a verified peer certificate; AuthError if it is not a
    connector certificate."""
    cert = x509.load_der_x509_certificate(der)
    ou = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not ou or ou[0].value != CONNECTOR_OU or not cn:
        raise AuthError("not a connector certificate", code="invalid_client_certificate")
    return str(cn[0].value), format(cert.serial_number, "x")


def _covers(pem: str, names: list[str]) -> bool:
    cert = x509.load_pem_x509_certificate(pem.encode())
    if cert.not_valid_after_utc < _now() + dt.timedelta(days=30):
        return False
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    have = {str(v) for v in san.get_values_for_type(x509.DNSName)}
    have |= {str(v) for v in san.get_values_for_type(x509.IPAddress)}
    wanted = set()
    for n in names:
        try:
            wanted.add(str(ipaddress.ip_address(n)))
        except ValueError:
            wanted.add(n)
    return wanted <= have


def _self_signed_ca(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Limen internal CA")])
    now = _now()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )


def _issue(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    public_key: object,
    common_name: str,
    *,
    ttl: int,
    sans: list[str],
    server: bool,
) -> x509.Certificate:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if not server:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, CONNECTOR_OU))
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(attrs))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)  # type: ignore[arg-type]
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(seconds=ttl))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(_san_entries(sans)), False)
    return builder.sign(ca_key, hashes.SHA256())
