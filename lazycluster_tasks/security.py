"""Per-cluster TLS: a fresh key and certificate made on this machine for each cluster.

Dask's ``tcp://`` lets whoever reaches a scheduler or worker port run code as the cluster's user.
Every cluster therefore gets its own self-signed certificate (it is also the CA every process
trusts) and key, made here with ``cryptography``. They reach the hosts inside the start command's
stdin, land in ``<cluster folder>/tls/`` with mode 0600 (folder 0700) and go with the folder at
cleanup; the processes are given only the file paths. The controller's clients hold them in
memory (``distributed.Security``). Connections need a certificate signed by the cluster's key in
both directions (Dask requires client certificates), so a process without the files cannot talk
to the cluster, even on a host that can reach its ports.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import posixpath
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

#: Where the files go, under the cluster folder.
TLS_FOLDER = "tls"
#: Validity starts this far back: a host whose clock lags still accepts the certificate.
BACKDATE = datetime.timedelta(days=1)
VALIDITY = datetime.timedelta(days=365)


@dataclass(frozen=True)
class TLSPaths:
    """The files a process is given on its host (paths only, never their contents)."""

    ca: str
    cert: str
    key: str


@dataclass(frozen=True, repr=False)
class ClusterTLS:
    """A cluster's CA, certificates and keys: PEM contents (delivered by us) or paths that
    already exist on every host (a user's own certificates)."""

    ca: str
    scheduler_cert: str
    scheduler_key: str
    worker_cert: str
    worker_key: str
    client_cert: str
    client_key: str

    @classmethod
    def generate(cls) -> ClusterTLS:
        """A fresh self-signed certificate (its own CA) and key for every role."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lazycluster")])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + VALIDITY)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("lazycluster")]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256())
        )
        cert_pem = cert.public_bytes(serialization.Encoding.PEM).decode()
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
        return cls(cert_pem, cert_pem, key_pem, cert_pem, key_pem, cert_pem, key_pem)

    @classmethod
    def from_security(cls, security: Any) -> ClusterTLS:
        """A user's ``distributed.Security``: its scheduler, worker and client files (contents
        are delivered like ours; paths must exist on the hosts)."""
        ca = security.tls_ca_file
        worker = (security.tls_worker_cert, security.tls_worker_key)
        scheduler = (
            security.tls_scheduler_cert or worker[0],
            security.tls_scheduler_key or worker[1],
        )
        client = (security.tls_client_cert or worker[0], security.tls_client_key or worker[1])
        missing = [n for n, v in (("tls_ca_file", ca), ("tls_worker_cert", worker[0]),
                                  ("tls_worker_key", worker[1])) if not v]  # fmt: skip
        if missing:
            raise ValueError(f"security needs {', '.join(missing)} for the cluster's processes")
        return cls(ca, *scheduler, *worker, *client)

    def security(self) -> Any:
        """This machine's ``distributed.Security``: encryption required, certificates held."""
        from distributed import Security

        return Security(
            require_encryption=True,
            tls_ca_file=self.ca,
            tls_client_cert=self.client_cert,
            tls_client_key=self.client_key,
            tls_scheduler_cert=self.scheduler_cert,
            tls_scheduler_key=self.scheduler_key,
            tls_worker_cert=self.worker_cert,
            tls_worker_key=self.worker_key,
        )

    def _entries(self, role: str) -> dict[str, str]:
        cert, key = (
            (self.scheduler_cert, self.scheduler_key)
            if role == "master"
            else (self.worker_cert, self.worker_key)
        )
        return {"ca.pem": self.ca, f"{role}-cert.pem": cert, f"{role}-key.pem": key}

    def files(self, role: str) -> dict[str, str]:
        """What a process of ``role`` needs in the cluster folder: relative path -> contents
        (PEM contents only; paths are the user's, already on the hosts)."""
        return {
            posixpath.join(TLS_FOLDER, name): value
            for name, value in self._entries(role).items()
            if _is_pem(value)
        }

    def paths(self, folder: str, role: str) -> TLSPaths:
        """Where a process of ``role`` ("master" or "worker") finds its files on its host."""
        found = [
            posixpath.join(folder, TLS_FOLDER, name) if _is_pem(value) else value
            for name, value in self._entries(role).items()
        ]
        return TLSPaths(*found)

    def __repr__(self) -> str:  # never the keys
        digest = hashlib.sha256(self.ca.encode()).hexdigest()[:12]
        return f"ClusterTLS(ca sha256 {digest}...)"


def _is_pem(value: str) -> bool:
    return "-----BEGIN" in value


def cluster_tls(choice: Any) -> ClusterTLS | None:
    """``True`` (default): fresh certificates; ``False``: none (warned); a
    ``distributed.Security`` or a :class:`ClusterTLS`: the user's own."""
    if choice is True:
        return ClusterTLS.generate()
    if choice is False:
        logger.warning(
            "security=False: the cluster's ports speak unencrypted tcp:// and anyone who can "
            "reach them can run code as the cluster's user"
        )
        return None
    if isinstance(choice, ClusterTLS):
        return choice
    if hasattr(choice, "tls_ca_file"):
        return ClusterTLS.from_security(choice)
    raise ValueError(f"security must be True, False or a distributed.Security, not {choice!r}")
