"""TLS off loopback: the stack's own certificate authority and a server certificate for TEAM_HOST.

Made once with the cryptography package. The CA's key stays in the state folder (0600, the service user's);
its certificate is copied beside the env file for clients (Settings.ca_file), who trust the servers through it.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil

from .processes import chown_tree
from .settings import Settings, write_private


def ensure_certificates(s: Settings, user: str) -> None:
    """A CA of this stack and a server certificate for TEAM_HOST, made once with the cryptography package. The CA's
    key stays in the state folder; its certificate is copied beside the env file for clients (ca_file)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder = s.tls_dir
    if not (folder / "server.pem").exists():
        folder.mkdir(mode=0o700, exist_ok=True)
        now = datetime.datetime.now(datetime.UTC)
        ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"mnistgen team CA ({s.host})")])
        ca = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .sign(ca_key, hashes.SHA256())
        )
        names: list[x509.GeneralName] = [x509.DNSName("localhost")]
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(s.host)))
        except ValueError:
            names.append(x509.DNSName(s.host))
        server = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, s.host)]))
            .issuer_name(ca_name)
            .public_key(server_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=825))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        pem = serialization.Encoding.PEM

        def key_pem(key) -> str:
            return key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()

        write_private(folder / "ca.key", key_pem(ca_key), user)
        write_private(folder / "server.key", key_pem(server_key), user)
        write_private(folder / "ca.pem", ca.public_bytes(pem).decode(), user)
        write_private(folder / "server.pem", server.public_bytes(pem).decode(), user)
        chown_tree(folder, user)
    s.ca_file.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(folder / "ca.pem", s.ca_file)
    os.chmod(s.ca_file, 0o644)  # a certificate is public
