"""TLS and SuperNode authentication material for a deployment.

* TLS: the SuperLink takes ``--ssl-ca-certfile/--ssl-certfile/--ssl-keyfile``, SuperNodes and
  connections take the CA as ``--root-certificates`` / ``root-certificates``.
  :func:`make_certificates` writes a throwaway CA and server certificate.
* SuperNode authentication needs no extra service: ``--enable-supernode-auth`` on a TLS
  SuperLink, one EC key pair per SuperNode (OpenSSH format), the public key registered with
  ``flwr supernode register``, the private key given to ``--auth-supernode-private-key``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["NodeKeys", "TlsFiles", "make_certificates", "make_node_keys"]


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of a TLS deployment: the CA, and the SuperLink's certificate and key."""

    ca_cert: str
    server_cert: str
    server_key: str


@dataclass(frozen=True)
class NodeKeys:
    """One SuperNode's authentication key pair (OpenSSH format, EC P-384)."""

    private_key: str
    public_key: str


def make_certificates(
    directory: str | Path,
    *,
    hosts: Sequence[str] = ("127.0.0.1", "localhost"),
    days: int = 30,
    common_name: str = "dsparse-superlink",
) -> TlsFiles:
    """Write a throwaway CA and a SuperLink certificate signed by it.

    Parameters
    ----------
    directory : str or Path
        Where ``ca.crt``, ``ca.key``, ``server.pem`` and ``server.key`` go (created).
    hosts : sequence of str
        Names and IP addresses the SuperNodes use to reach the SuperLink; each becomes a
        subject alternative name, which TLS checks against the address dialled.
    days : int
        Validity of both certificates.

    Returns
    -------
    TlsFiles
        The paths to give the SuperLink (all three) and the SuperNodes (``ca_cert``).
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if not hosts:
        raise ValueError("hosts is empty; give the addresses SuperNodes dial, e.g. 127.0.0.1,localhost")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)  # tolerate clock skew
    until = now + dt.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{common_name}-ca")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(until)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    def write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        path.chmod(0o600)

    files = TlsFiles(str(out / "ca.crt"), str(out / "server.pem"), str(out / "server.key"))
    Path(files.ca_cert).write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    write_key(out / "ca.key", ca_key)
    Path(files.server_cert).write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    write_key(Path(files.server_key), server_key)
    return files


def make_node_keys(directory: str | Path, name: str) -> NodeKeys:
    """Write a SuperNode authentication key pair: ``<name>`` and ``<name>.pub`` (OpenSSH, P-384)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private = out / name
    public = out / f"{name}.pub"
    private.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    )
    private.chmod(0o600)
    public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )
    return NodeKeys(str(private), str(public))
