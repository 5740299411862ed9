"""A mosquitto on the host's loopback, plain or with TLS and a password, for the units and
tests to talk to (a real broker, not a mock)."""

from __future__ import annotations

import datetime
import ipaddress
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..hostcmd import die_with_parent
from .qemu import free_port

# mosquitto started as root would switch to its own user, and a change of user clears the
# death signal die_with_parent asks for: a test broker on the loopback keeps the user it
# was started as (the line is ignored when that is not root)
KEEP_USER = "user root\n"


@dataclass(frozen=True)
class BrokerTls:
    """What a client needs to reach a TLS broker: the CA that signed it, and a login."""

    ca_file: Path
    username: str
    password: str


class LocalBroker:
    def __init__(self, proc: subprocess.Popen[bytes], port: int,
                 tls: BrokerTls | None = None) -> None:
        self.proc = proc
        self.port = port
        self.tls = tls
        self.folder: Path | None = None  # files of its own, removed at stop()

    @classmethod
    def start_if_available(cls, folder: Path) -> LocalBroker | None:
        """Anonymous and plaintext, on 127.0.0.1 (where mosquitto is installed)."""
        if shutil.which("mosquitto") is None:
            return None
        port = free_port()
        conf = folder / "mosquitto.conf"
        conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n"
                        f"persistence false\n{KEEP_USER}")
        return cls(cls._run(conf), port)

    @classmethod
    def start_tls(cls, username: str = "unit", password: str = "unit-pass",
                  addresses: tuple[str, ...] = ("127.0.0.1",)) -> LocalBroker:
        """TLS on 127.0.0.1 with a certificate for `addresses` (the host's loopback, and the
        address a QEMU guest reaches it at) from a CA made here, and one login. Its files go
        into a folder of their own (mkdtemp: for this user only); stop() removes it."""
        folder = Path(tempfile.mkdtemp(prefix="edgebake-broker-"))
        ca_file, cert_file, key_file = _certificates(folder, addresses)
        passwords = folder / "mosquitto.passwd"
        subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwords), username, password],
                       check=True, capture_output=True)
        port = free_port()
        conf = folder / "mosquitto-tls.conf"
        conf.write_text(f"listener {port} 127.0.0.1\ncafile {ca_file}\ncertfile {cert_file}\n"
                        f"keyfile {key_file}\nallow_anonymous false\n"
                        f"password_file {passwords}\npersistence false\n{KEEP_USER}")
        broker = cls(cls._run(conf), port, BrokerTls(ca_file, username, password))
        broker.folder = folder
        return broker

    @staticmethod
    def _run(conf: Path) -> subprocess.Popen[bytes]:
        """Started to end with the process that started it (a test run killed outright
        leaves no broker behind)."""
        return subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, preexec_fn=die_with_parent)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


def _certificates(folder: Path, addresses: tuple[str, ...]) -> tuple[Path, Path, Path]:
    """(CA certificate, server certificate for `addresses`, server key), written to folder."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgebake test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(hours=1))
          .not_valid_after(now + datetime.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(a)) for a in addresses]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    paths = folder / "ca.pem", folder / "broker.pem", folder / "broker.key"
    paths[0].write_bytes(ca.public_bytes(pem))
    paths[1].write_bytes(cert.public_bytes(pem))
    paths[2].write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    paths[2].chmod(0o600)
    return paths
