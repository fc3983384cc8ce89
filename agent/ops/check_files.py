"""``doctor``'s checks of the files a node needs: the config, the seal keys, the brokers'
certificates, keys and password files."""

from __future__ import annotations

import stat
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes

from agent.config import BrokerConfig, Config, ConfigError, load_config
from agent.crypto import keys
from agent.crypto.aead_choice import choose_aead
from agent.ops.findings import (
    EXPIRY_WARNING,
    Finding,
    describe_mode,
    fail,
    ok,
    unreadable_fix,
    warn,
    who,
)
from agent.transport.broker_url import is_loopback

# -- config ------------------------------------------------------------------------------


def check_config(path: Path) -> tuple[Config | None, list[Finding]]:
    try:
        config = load_config(path)
    except ConfigError as exc:
        unreadable = not path.is_file() or any(
            p.startswith(("cannot read file", "not a text file")) for p in exc.problems)
        fix = ("give --config the agent's TOML file (`iomt-agent init` writes one)" if unreadable
               else "fix the key named here (README.md, 'Configuration')")
        return None, [fail("config", str(path), problem, f"{fix}, then run the doctor again")
                      for problem in exc.problems]
    found = [ok("config", str(path),
                 f"valid (site {config.agent.site}, device {config.agent.device_id})")]
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o002:
        found.append(fail("config", str(path), f"writable by everyone (mode {mode:04o})",
                           f"chmod 640 {path}"))
    elif mode & 0o020:
        found.append(warn("config", str(path), f"writable by its group (mode {mode:04o})",
                           f"chmod 640 {path}"))
    return config, found


# -- keys --------------------------------------------------------------------------------


def _mode_problem(path: Path) -> str | None:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        return f"mode {mode:04o}: group/others can access it"
    return None


def _secret_file(subject: str, path: Path) -> tuple[bytes | None, Finding | None]:
    """Read a secret file, or say why not (missing, unreadable, too permissive)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None, fail("key", subject, f"{path} not found",
                           "create it, or fix the path in the config")
    except PermissionError:
        return None, fail("key", subject, f"{path}: permission denied for {who()}",
                           unreadable_fix(path))
    except OSError as exc:
        return None, fail("key", subject, f"{path}: {exc.strerror}", "check the file")
    problem = _mode_problem(path)
    if problem:
        return None, fail("key", subject, f"{path}: {problem}", f"chmod 600 {path}")
    if not data.strip():
        return None, fail("key", subject, f"{path} is empty", "put the secret in it")
    return data, None


def check_seal_keys(config: Config) -> list[Finding]:
    found: list[Finding] = []
    signing = config.seal.device_signing_key
    _, problem = _secret_file("seal.device_signing_key", signing)
    if problem is not None:
        found.append(problem)
    else:
        try:
            key = keys.load_signing_key(signing)
            pub = key.public_key().public_bytes(serialization.Encoding.Raw,
                                                serialization.PublicFormat.Raw)
            found.append(ok("key", "seal.device_signing_key",
                             f"{signing}: Ed25519, {describe_mode(signing)}, "
                             f"public key id {keys.key_id_for(pub)[:16]}"))
        except keys.KeyFileError as exc:
            found.append(fail("key", "seal.device_signing_key", str(exc),
                               "replace it with an unencrypted PKCS#8 Ed25519 key (0600)"))
    recipient = config.seal.recipient_public_key
    try:
        rkey = keys.load_recipient_public_key(recipient)
        found.append(ok("key", "seal.recipient_public_key",
                         f"{recipient}: {rkey.kind}, key id {keys.key_id_for(rkey.raw)[:16]}"))
    except keys.KeyFileError as exc:
        found.append(fail("key", "seal.recipient_public_key", str(exc),
                           "get the cloud's recipient public key from the cloud operator "
                           "(install.sh --recipient-key FILE)"))
    choice = choose_aead(config.seal.aead)
    found.append(ok("key", "seal.aead", f"envelopes sealed with {choice.aead} "
                    f"({choice.reason})"))
    return found


# -- certificates and broker secrets --------------------------------------------------------


def _cn(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(names[0].value) if names else cert.subject.rfc4514_string() or "(no subject)"


def _validity(subject: str, path: Path, cert: x509.Certificate, now: datetime) -> Finding:
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    name = f"{path}: '{_cn(cert)}'"
    if now < start:
        return fail("certificate", subject, f"{name} is not valid before {start:%Y-%m-%d %H:%M} "
                     "UTC", "check the clock (timedatectl status) or the certificate")
    if now > end:
        return fail("certificate", subject, f"{name} expired on {end:%Y-%m-%d} "
                     f"({(now - end).days} days ago)", "renew the certificate and replace the file")
    left = end - now
    if left < EXPIRY_WARNING:
        return warn("certificate", subject, f"{name} expires on {end:%Y-%m-%d} "
                     f"(in {left.days} days)", "renew the certificate soon")
    return ok("certificate", subject, f"{name} valid until {end:%Y-%m-%d}")


def _load_certs(subject: str, path: Path) -> tuple[list[x509.Certificate], Finding | None]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], fail("certificate", subject, f"{path} not found",
                         "copy the PEM file there, or fix the path in the config")
    except OSError as exc:
        return [], fail("certificate", subject, f"{path}: {exc.strerror}", unreadable_fix(path))
    try:
        return x509.load_pem_x509_certificates(data), None
    except ValueError:
        return [], fail("certificate", subject, f"{path}: no PEM certificate in it",
                         "use a PEM file (-----BEGIN CERTIFICATE-----)")


def _public_bytes(key: PublicKeyTypes) -> bytes:
    return key.public_bytes(serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def check_broker_files(role: str, cfg: BrokerConfig, now: datetime) -> list[Finding]:
    found: list[Finding] = []
    if not cfg.tls and not is_loopback(cfg.host):  # the config allowed it explicitly
        found.append(warn("broker", f"{role}.url", f"{cfg.url} is plaintext MQTT off "
                          "loopback (allow_plaintext = true): scans, results and status "
                          "travel unencrypted and the broker is not authenticated",
                          f"use mqtts:// in {role}.url with ca_file, cert_file, key_file "
                          "(`iomt-agent certs init` makes a development PKI)"))
    if not cfg.tls and (cfg.ca_file or cfg.cert_file or cfg.key_file):
        found.append(warn("certificate", f"{role}.url", f"{cfg.url} is plain MQTT: the "
                           "TLS files are not used", f"use mqtts:// in {role}.url"))
    if cfg.password_file is not None:
        if cfg.username is None:
            found.append(warn("key", f"{role}.password_file", "set without a username: "
                               "not used", f"set {role}.username"))
        _, problem = _secret_file(f"{role}.password_file", cfg.password_file)
        found.append(problem or ok("key", f"{role}.password_file",
                                    f"{cfg.password_file}: {describe_mode(cfg.password_file)}"))
    if cfg.ca_file is not None:
        certs, problem = _load_certs(f"{role}.ca_file", cfg.ca_file)
        found += [problem] if problem else [
            _validity(f"{role}.ca_file", cfg.ca_file, c, now) for c in certs]
    if cfg.cert_file is not None:
        certs, problem = _load_certs(f"{role}.cert_file", cfg.cert_file)
        if problem:
            found.append(problem)
        else:
            found.append(_validity(f"{role}.cert_file", cfg.cert_file, certs[0], now))
            found += _check_client_key(role, cfg, certs[0])
    elif cfg.key_file is not None:
        found.append(fail("key", f"{role}.key_file", "set without cert_file",
                           f"set {role}.cert_file to the matching client certificate"))
    return found


def _check_client_key(role: str, cfg: BrokerConfig, cert: x509.Certificate) -> list[Finding]:
    subject = f"{role}.key_file"
    key_path = cfg.key_file or cfg.cert_file
    assert key_path is not None
    data, problem = (_secret_file(subject, key_path) if cfg.key_file
                     else (key_path.read_bytes(), None))
    if problem is not None or data is None:
        return [problem] if problem else []
    try:
        key: PrivateKeyTypes = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        where = key_path if cfg.key_file else f"{key_path} (no key_file: key expected here)"
        return [fail("key", subject, f"{where}: no unencrypted PEM private key ({exc})",
                      f"set {role}.key_file to the client certificate's private key")]
    if _public_bytes(key.public_key()) != _public_bytes(cert.public_key()):
        return [fail("key", subject, f"{key_path} does not belong to {cfg.cert_file}",
                      "use the key the certificate was issued for")]
    return [ok("key", subject, f"{key_path}: matches the client certificate"
                + (f", {describe_mode(key_path)}" if cfg.key_file else ""))]
