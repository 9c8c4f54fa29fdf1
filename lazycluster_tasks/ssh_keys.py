"""Our keys (the client's): key text, IdentityFiles (missing ones skipped, as OpenSSH does) and
CertificateFiles (each loaded onto the key it belongs to).
"""

from __future__ import annotations

import io
import logging
import os

import paramiko

from lazycluster_tasks.errors import AuthenticationError
from lazycluster_tasks.ssh_settings import SSHSettings

logger = logging.getLogger(__name__)


def load_private_key(text: str, passphrase: str | None, host: str) -> paramiko.PKey:
    """A private key from its text (OpenSSH or PEM; ed25519, ECDSA or RSA)."""
    for cls in (paramiko.Ed25519Key, paramiko.ECDSAKey, paramiko.RSAKey):
        try:
            return cls.from_private_key(io.StringIO(text), passphrase)
        except paramiko.PasswordRequiredException:
            raise AuthenticationError(
                f"the private key for {host} is encrypted and needs a passphrase", host=host
            ) from None
        except (paramiko.SSHException, ValueError):
            continue
    hint = " (wrong passphrase?)" if passphrase else ""
    raise AuthenticationError(f"the private key given for {host} cannot be read{hint}", host=host)


def identities(settings: SSHSettings) -> tuple[paramiko.PKey | None, list[str]]:
    """``(pkey, key_files)`` for paramiko: ``pkey`` is ``private_key`` or, with a CertificateFile,
    the key the certificate belongs to (loaded onto it); ``key_files`` are the IdentityFiles that
    exist, less the one ``pkey`` came from."""
    key_files = [k for k in settings.key_filenames if os.path.exists(k)]
    missing = set(settings.key_filenames) - set(key_files)
    if missing:  # OpenSSH skips identity files that do not exist, and so do we
        logger.debug("identity files of %s not found: %s", settings.alias, sorted(missing))
    return _keys_with_certificates(settings, key_files)


def _keys_with_certificates(
    settings: SSHSettings, key_files: list[str]
) -> tuple[paramiko.PKey | None, list[str]]:
    """CertificateFile: the private key a certificate belongs to, with the certificate loaded
    onto it (paramiko ``load_certificate``); the remaining key files."""
    pkey = (
        load_private_key(settings.private_key, settings.passphrase, settings.alias)
        if settings.private_key
        else None
    )
    certificates = [c for c in settings.certificate_files if os.path.exists(c)]
    if not certificates:
        return pkey, key_files
    candidates: list[tuple[paramiko.PKey, str | None]] = [(pkey, None)] if pkey else []
    for path in key_files:
        try:
            candidates.append((paramiko.PKey.from_path(path, settings.passphrase), path))
        except (paramiko.SSHException, ValueError, OSError) as exc:
            logger.debug("cannot load key %s: %s", path, exc)
    for cert in certificates:
        for key, key_path in candidates:
            try:
                key.load_certificate(cert)
            except (ValueError, paramiko.SSHException, OSError):
                continue
            return key, [k for k in key_files if k != key_path]
    logger.warning(
        "no identity of %s matches its CertificateFile %s", settings.alias, ", ".join(certificates)
    )
    return pkey, key_files
