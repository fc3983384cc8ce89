"""The one TLS client context: what the MQTT connections and ``doctor``'s probe use.

TLS 1.2 or newer, the server's certificate verified against ``ca_file`` (or the system's
store) and its host name checked, and the client certificate and key where the config names
them (mutual TLS). A file that cannot be used raises ``TLSFilesError``, which names the
config key, the file and what is wrong with it (OpenSSL's own words say little: "PEM lib").
"""

from __future__ import annotations

import ssl
from pathlib import Path

from agent.config import BrokerConfig
from agent.errors import AgentError


class TLSFilesError(AgentError):
    """A CA, certificate or key file named in a broker section cannot be used."""


def _why(exc: Exception, what: str) -> str:
    """OpenSSL's reason, in words a site engineer can act on."""
    if isinstance(exc, FileNotFoundError):
        return "no such file"
    if isinstance(exc, IsADirectoryError):
        return "is a directory, not a file"
    if isinstance(exc, PermissionError):
        return "cannot be read by this user"
    reason = getattr(exc, "reason", None) or ""
    if reason == "KEY_VALUES_MISMATCH":
        return "the key in key_file does not belong to the certificate in cert_file"
    if reason == "NO_CERTIFICATE_OR_CRL_FOUND":
        return f"holds no PEM {what}"
    if reason in ("PEM_LIB", "") or "PEM lib" in str(exc):
        return f"is not a PEM {what}, or the key is missing (set key_file)"
    return f"{what} not usable: {exc}"


def client_context(cfg: BrokerConfig, role: str = "broker") -> ssl.SSLContext:
    """An SSL context for connecting to the broker ``cfg`` names (``role``: its config
    section, for the messages). Raises ``TLSFilesError``."""
    for name in ("ca_file", "cert_file", "key_file"):
        path: Path | None = getattr(cfg, name)
        if path is not None:
            try:
                path.open("rb").close()
            except OSError as exc:
                raise TLSFilesError(f"{role}.{name} {path}: {_why(exc, 'file')}") from None
    try:
        ctx = ssl.create_default_context(cafile=str(cfg.ca_file) if cfg.ca_file else None)
    except (OSError, ssl.SSLError) as exc:
        raise TLSFilesError(f"{role}.ca_file {cfg.ca_file}: "
                            f"{_why(exc, 'CA certificate')}") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cfg.cert_file:
        try:
            ctx.load_cert_chain(str(cfg.cert_file), str(cfg.key_file) if cfg.key_file else None)
        except (OSError, ssl.SSLError) as exc:
            where = f"{role}.cert_file {cfg.cert_file}" + (
                f" / key_file {cfg.key_file}" if cfg.key_file else "")
            raise TLSFilesError(f"{where}: {_why(exc, 'certificate and key')}") from None
    return ctx
