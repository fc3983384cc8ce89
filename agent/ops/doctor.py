"""``iomt-agent doctor --config PATH``: is this node ready to serve? A checklist for the
site engineer, one line per check, each ``ok`` or what is wrong and how to fix it:

* the config file is valid (and not writable by others);
* key files: present, readable, private ones not accessible to group/others, of the right kind;
* certificates (CA bundles, client certificates): valid now, not expiring within 30 days,
  client certificate matching its key;
* each broker: name resolves, TCP port open, TLS handshake verifies, MQTT CONNECT accepted
  with the configured credentials (a short-lived session under a separate client id, so the
  running agent's session is not taken over);
* the model bundle: present, every file's sha256 as recorded, loads in the runtime, runs on
  zeros, and passes its golden set (int8 output against the fp32 reference, the bundle's
  PSNR floor) when the bundle carries one;
* free disk for the inbox/outbox stores.

Exit status: 0 when nothing failed (warnings allowed), 1 when a check failed, 2 when the
config cannot be read at all.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import stat
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TextIO

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes

from agent.config import BrokerConfig, Config, ConfigError, load_config
from agent.crypto import keys
from agent.model.guard_cause import format_db

if TYPE_CHECKING:
    from agent.backends import ModelRunner
    from agent.model.bundle import ModelBundle
    from agent.model.guard import GuardReport

Verdict = Literal["ok", "warn", "fail"]
EXIT_OK, EXIT_FAIL, EXIT_CONFIG = 0, 1, 2
EXPIRY_WARNING = timedelta(days=30)
MIN_FREE_BYTES = 256 * 1024 * 1024
GIB = 1024**3


@dataclass(frozen=True)
class Finding:
    verdict: Verdict
    check: str  # config | key | certificate | broker | model | disk
    subject: str  # what was checked: a key path, a broker, a file
    detail: str  # what was found
    fix: str = ""  # what to do about it (warn/fail)


def _ok(check: str, subject: str, detail: str) -> Finding:
    return Finding("ok", check, subject, detail)


def _warn(check: str, subject: str, detail: str, fix: str) -> Finding:
    return Finding("warn", check, subject, detail, fix)


def _fail(check: str, subject: str, detail: str, fix: str) -> Finding:
    return Finding("fail", check, subject, detail, fix)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _who() -> str:
    return "root" if os.geteuid() == 0 else f"uid {os.geteuid()}"


def _unreadable_fix(path: Path) -> str:
    return (f"run the doctor as root (sudo), or check the ownership of {path}; the service "
            "itself gets secrets through LoadCredential=")


# -- config ------------------------------------------------------------------------------


def check_config(path: Path) -> tuple[Config | None, list[Finding]]:
    try:
        config = load_config(path)
    except ConfigError as exc:
        return None, [
            _fail("config", str(path), problem, "fix the key named here (README.md, "
                  "'Configuration'), then run the doctor again")
            for problem in exc.problems
        ]
    found = [_ok("config", str(path),
                 f"valid (site {config.agent.site}, device {config.agent.device_id})")]
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o002:
        found.append(_fail("config", str(path), f"writable by everyone (mode {mode:04o})",
                           f"chmod 640 {path}"))
    elif mode & 0o020:
        found.append(_warn("config", str(path), f"writable by its group (mode {mode:04o})",
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
        return None, _fail("key", subject, f"{path} not found",
                           "create it, or fix the path in the config")
    except PermissionError:
        return None, _fail("key", subject, f"{path}: permission denied for {_who()}",
                           _unreadable_fix(path))
    except OSError as exc:
        return None, _fail("key", subject, f"{path}: {exc.strerror}", "check the file")
    problem = _mode_problem(path)
    if problem:
        return None, _fail("key", subject, f"{path}: {problem}", f"chmod 600 {path}")
    if not data.strip():
        return None, _fail("key", subject, f"{path} is empty", "put the secret in it")
    return data, None


def _describe_mode(path: Path) -> str:
    st = path.stat()
    return f"mode {stat.S_IMODE(st.st_mode):04o}, owner uid {st.st_uid}"


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
            found.append(_ok("key", "seal.device_signing_key",
                             f"{signing}: Ed25519, {_describe_mode(signing)}, "
                             f"public key id {keys.key_id_for(pub)[:16]}"))
        except keys.KeyFileError as exc:
            found.append(_fail("key", "seal.device_signing_key", str(exc),
                               "replace it with an unencrypted PKCS#8 Ed25519 key (0600)"))
    recipient = config.seal.recipient_public_key
    try:
        rkey = keys.load_recipient_public_key(recipient)
        found.append(_ok("key", "seal.recipient_public_key",
                         f"{recipient}: {rkey.kind}, key id {keys.key_id_for(rkey.raw)[:16]}"))
    except keys.KeyFileError as exc:
        found.append(_fail("key", "seal.recipient_public_key", str(exc),
                           "get the cloud's recipient public key from the cloud operator "
                           "(install.sh --recipient-key FILE)"))
    return found


# -- certificates and broker secrets --------------------------------------------------------


def _cn(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(names[0].value) if names else cert.subject.rfc4514_string() or "(no subject)"


def _validity(subject: str, path: Path, cert: x509.Certificate, now: datetime) -> Finding:
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    name = f"{path}: '{_cn(cert)}'"
    if now < start:
        return _fail("certificate", subject, f"{name} is not valid before {start:%Y-%m-%d %H:%M} "
                     "UTC", "check the clock (timedatectl status) or the certificate")
    if now > end:
        return _fail("certificate", subject, f"{name} expired on {end:%Y-%m-%d} "
                     f"({(now - end).days} days ago)", "renew the certificate and replace the file")
    left = end - now
    if left < EXPIRY_WARNING:
        return _warn("certificate", subject, f"{name} expires on {end:%Y-%m-%d} "
                     f"(in {left.days} days)", "renew the certificate soon")
    return _ok("certificate", subject, f"{name} valid until {end:%Y-%m-%d}")


def _load_certs(subject: str, path: Path) -> tuple[list[x509.Certificate], Finding | None]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], _fail("certificate", subject, f"{path} not found",
                         "copy the PEM file there, or fix the path in the config")
    except OSError as exc:
        return [], _fail("certificate", subject, f"{path}: {exc.strerror}", _unreadable_fix(path))
    try:
        return x509.load_pem_x509_certificates(data), None
    except ValueError:
        return [], _fail("certificate", subject, f"{path}: no PEM certificate in it",
                         "use a PEM file (-----BEGIN CERTIFICATE-----)")


def _public_bytes(key: PublicKeyTypes) -> bytes:
    return key.public_bytes(serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def check_broker_files(role: str, cfg: BrokerConfig, now: datetime) -> list[Finding]:
    found: list[Finding] = []
    if not cfg.tls and (cfg.ca_file or cfg.cert_file or cfg.key_file):
        found.append(_warn("certificate", f"{role}.url", f"{cfg.url} is plain MQTT: the "
                           "TLS files are not used", f"use mqtts:// in {role}.url"))
    if cfg.password_file is not None:
        if cfg.username is None:
            found.append(_warn("key", f"{role}.password_file", "set without a username: "
                               "not used", f"set {role}.username"))
        _, problem = _secret_file(f"{role}.password_file", cfg.password_file)
        found.append(problem or _ok("key", f"{role}.password_file",
                                    f"{cfg.password_file}: {_describe_mode(cfg.password_file)}"))
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
        found.append(_fail("key", f"{role}.key_file", "set without cert_file",
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
        return [_fail("key", subject, f"{where}: no unencrypted PEM private key ({exc})",
                      f"set {role}.key_file to the client certificate's private key")]
    if _public_bytes(key.public_key()) != _public_bytes(cert.public_key()):
        return [_fail("key", subject, f"{key_path} does not belong to {cfg.cert_file}",
                      "use the key the certificate was issued for")]
    return [_ok("key", subject, f"{key_path}: matches the client certificate"
                + (f", {_describe_mode(key_path)}" if cfg.key_file else ""))]


# -- brokers -----------------------------------------------------------------------------


def _tls_context(cfg: BrokerConfig) -> ssl.SSLContext:
    """What paho builds from the same config (tls_set with CERT_REQUIRED)."""
    ctx = ssl.create_default_context(cafile=str(cfg.ca_file) if cfg.ca_file else None)
    if cfg.cert_file:
        ctx.load_cert_chain(str(cfg.cert_file), str(cfg.key_file) if cfg.key_file else None)
    return ctx


def check_broker(role: str, cfg: BrokerConfig, client_id: str, timeout: float) -> list[Finding]:
    subject = f"{role} {cfg.url}"
    try:
        sock = socket.create_connection((cfg.host, cfg.port), timeout=timeout)
    except socket.gaierror as exc:
        return [_fail("broker", subject, f"cannot resolve {cfg.host}: {exc.strerror}",
                      f"check {role}.url and the node's DNS (resolvectl status)")]
    except TimeoutError:
        return [_fail("broker", subject, f"no answer from {cfg.host}:{cfg.port} within "
                      f"{timeout:g} s", "check the network path and firewalls to the broker")]
    except OSError as exc:
        return [_fail("broker", subject, f"cannot connect to {cfg.host}:{cfg.port}: "
                      f"{exc.strerror or exc}", f"check {role}.url (host and port) and that "
                      "the broker is running")]
    detail = "TCP ok"
    with sock:
        if cfg.tls:
            try:
                ctx = _tls_context(cfg)
                with ctx.wrap_socket(sock, server_hostname=cfg.host) as tls:
                    peer = tls.getpeercert() or {}
                    detail = f"{tls.version()}, server certificate valid until " \
                             f"{peer.get('notAfter', '?')}"
            except ssl.SSLCertVerificationError as exc:
                return [_fail("broker", subject, f"TLS: the broker's certificate does not "
                              f"verify: {exc.verify_message}",
                              f"set {role}.ca_file to the CA that signed the broker's "
                              "certificate, and use the host name the certificate names")]
            except (ssl.SSLError, OSError) as exc:
                return [_fail("broker", subject, f"TLS handshake failed: {exc}",
                              f"check {role}.ca_file, cert_file and key_file, and that the "
                              "port speaks TLS")]
    return [_mqtt_connect(role, cfg, client_id, timeout, detail)]


def _mqtt_connect(role: str, cfg: BrokerConfig, client_id: str, timeout: float,
                  detail: str) -> Finding:
    from agent.transport.mqtt import Connection, MqttError

    class Probe(Connection):
        """Keeps the CONNACK's refusal: the disconnect that follows it would overwrite
        ``last_error`` with a less telling reason."""

        refusal: str | None = None

        def _on_connect(self, *args: Any) -> None:
            super()._on_connect(*args)
            if self.last_error and self.refusal is None:
                self.refusal = self.last_error

    subject = f"{role} {cfg.url}"
    # Session expiry 0: the doctor leaves no persistent session (MQTT 5) behind.
    probe_cfg = cfg.model_copy(update={"session_expiry_s": 0})
    try:
        conn = Probe(probe_cfg, client_id, name=f"{role}-doctor")
    except (OSError, ValueError) as exc:
        return _fail("broker", subject, f"cannot use the configured credentials: {exc}",
                     _unreadable_fix(Path(str(getattr(exc, "filename", "") or "the file"))))
    try:
        conn.start()
        deadline = time.monotonic() + timeout
        connected = False
        # A refused CONNECT sets last_error; paho would keep retrying until the deadline.
        while not connected and conn.last_error is None and time.monotonic() < deadline:
            connected = conn.wait_connected(0.05)
        error = conn.refusal or conn.last_error
    except MqttError as exc:
        connected, error = False, str(exc)
    finally:
        conn.stop()
    who = f"as {cfg.username!r}" if cfg.username else "anonymously"
    if connected:
        return _ok("broker", subject, f"{detail}; MQTT {cfg.protocol} CONNECT accepted {who}")
    if error:
        text = error.lower()
        if "authori" in text or "user" in text or "password" in text:
            fix = f"check {role}.username and {role}.password_file (and the broker's ACL)"
        elif "protocol" in text:
            fix = f'the broker may not speak MQTT {cfg.protocol}: try {role}.protocol = "3.1.1"'
        elif "identifier" in text:
            fix = "the broker refused the client id: check its client id rules"
        else:
            fix = "see the broker's log"
        return _fail("broker", subject, f"{detail}; MQTT CONNECT {who}: {error}", fix)
    return _fail("broker", subject, f"{detail}; no CONNACK within {timeout:g} s",
                 f"check that {cfg.host}:{cfg.port} is an MQTT broker and {role}.protocol")


# -- model -------------------------------------------------------------------------------


def check_model(config: Config) -> list[Finding]:
    import numpy as np

    from agent.backends import BackendError, open_runner, runner_options
    from agent.model.bundle import BundleError, load_bundle

    subject = "model.bundle"
    backend = config.model.backend
    try:
        bundle = load_bundle(config.model.bundle)
        served = None if backend == "auto" else bundle.backend_file(backend)
    except BundleError as exc:
        return [_fail("model", subject, str(exc), "install a bundle: systemd/install.sh "
                      "--bundle DIR, or fix model.bundle")]
    found = [_ok("model", subject, f"{bundle.name} {bundle.version} at {bundle.root}: "
                 "every file matches its sha256")]
    started = time.perf_counter()
    guard: GuardReport | None = None
    try:
        if served is None:  # auto: what the agent would serve, chosen afresh (no cache)
            chosen = _choose(bundle, config, found)
            if chosen is None:
                return found
            runner, guard = chosen
        else:
            runner = open_runner(backend, str(served.path), runner_options(config.model, bundle))
    except BackendError as exc:
        return [*found, _fail("model", backend, str(exc),
                              "reinstall the runtime, or use a bundle built for it")]
    try:
        channels = bundle.input_channels
        zeros = np.zeros((1, channels, *bundle.input.shape), dtype=np.float32)
        out = runner.run(zeros)
        ms = (time.perf_counter() - started) * 1000
        if not np.all(np.isfinite(out)):
            found.append(_fail("model", backend, "output on zeros is not finite",
                               "the model file is broken: rebuild the bundle"))
        else:
            found.append(_ok("model", backend, f"runs: {list(zeros.shape)} -> "
                             f"{list(out.shape)} (load and first run {ms:.0f} ms)"))
        if bundle.golden is not None:
            if guard is None:
                from agent.model.guard import run_guard

                guard = run_guard(bundle, runner)
            found.append(_golden(guard))
    except Exception as exc:  # a runtime's own errors are untyped
        found.append(_fail("model", backend, f"inference failed: {exc}",
                           "check that the bundle's contract matches the model file"))
    finally:
        runner.close()
    return found


def _choose(bundle: ModelBundle, config: Config,
            found: list[Finding]) -> tuple[ModelRunner, GuardReport] | None:
    """``backend = "auto"``: open what the agent would serve and add a finding with the
    choice and its reason; None (a failed golden-set finding added) when nothing passes
    the guard. Raises ``BackendError`` when no runtime can open the model."""
    from agent.backends import runner_options
    from agent.model.guard import GuardFailed
    from agent.model.select import choose_runner

    try:
        runner, choice = choose_runner(bundle, runner_options(config.model, bundle), None)
    except GuardFailed as exc:
        found.append(_golden(exc.report))
        return None
    found.append(_ok("model", "backend auto", f"would serve {choice.runtime} "
                     f"{choice.precision}: {choice.reason}"))
    return runner, choice.guard


def _golden(report: GuardReport) -> Finding:
    """The bundle's activation guard (``agent.model.guard``), the same check ``run`` makes."""
    text = (f"{len(report.inputs)} golden slices: worst PSNR {format_db(report.worst_psnr_db)} "
            f"dB vs fp32 (floor {format_db(report.min_psnr_db)} dB)")
    if not report.ok:  # what failed and why; the fix on its own line
        why = "; ".join(t for t in (report.shortfall or report.reason, report.explanation) if t)
        return _fail("model", "golden set", f"{text}: {why}", report.fix or "rebuild the bundle")
    return _ok("model", "golden set", text)


# -- disk --------------------------------------------------------------------------------


def check_disk(config: Config) -> list[Finding]:
    state = config.agent.state_dir
    assert state is not None
    found: list[Finding] = []
    existing = state
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if state.exists():
        mode = stat.S_IMODE(state.stat().st_mode)
        if mode & 0o077:
            found.append(_warn("disk", "agent.state_dir", f"{state}: mode {mode:04o}",
                               f"the inbox holds scans (PHI): chmod 700 {state}"))
        else:
            found.append(_ok("disk", "agent.state_dir", f"{state}: {_describe_mode(state)}"))
        if not os.access(state, os.W_OK):
            found.append(_warn("disk", "agent.state_dir", f"{state} not writable by {_who()}",
                               "fine if the service user owns it (the unit's StateDirectory=)"
                               "; otherwise chown it to the service user"))
    else:
        found.append(_ok("disk", "agent.state_dir", f"{state} does not exist yet: systemd "
                         "(StateDirectory=) or the agent creates it at start"))
    usage = shutil.disk_usage(existing)
    used = sum(p.stat().st_size for p in state.glob("agent.db*")) if state.exists() else 0
    caps = config.limits.inbox_max_bytes + config.limits.outbox_max_bytes
    room = usage.free + used
    where = f"{_size(usage.free)} free on the file system of {existing}"
    if usage.free < MIN_FREE_BYTES:
        found.append(_fail("disk", "free space", where, f"free at least "
                           f"{_size(MIN_FREE_BYTES)}, or move agent.state_dir"))
    elif room < caps:
        found.append(_warn("disk", "free space", f"{where}; inbox + outbox may grow to "
                           f"{_size(caps)}", "lower limits.inbox_max_bytes and "
                           "limits.outbox_max_bytes to fit, or free space"))
    else:
        found.append(_ok("disk", "free space", f"{where}; inbox + outbox capped at "
                         f"{_size(caps)}"))
    return found


# -- the whole checklist ------------------------------------------------------------------


def run_checks(config_path: str | Path, *, timeout: float = 5.0,
               now: datetime | None = None) -> tuple[list[Finding], bool]:
    """Run every check. Returns the findings and whether the config could be read."""
    now = now or datetime.now(UTC)
    config, found = check_config(Path(config_path))
    if config is None:
        return found, False
    found += check_seal_keys(config)
    for role, cfg in (("edge", config.edge), ("cloud", config.cloud)):
        found += check_broker_files(role, cfg, now)
    a = config.agent
    for role, cfg in (("edge", config.edge), ("cloud", config.cloud)):
        base = cfg.client_id or f"iomt-{a.site}-{a.device_id}-{role}"
        found += check_broker(role, cfg, f"{base}-doctor", timeout)
    found += check_model(config)
    found += check_disk(config)
    return found, True


_MARK = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL"}


def render(findings: list[Finding], out: TextIO) -> None:
    width = max((len(f.check) for f in findings), default=5)
    for f in findings:
        out.write(f"{_MARK[f.verdict]}  {f.check:<{width}}  {f.subject}: {f.detail}\n")
        if f.fix:
            out.write(f"{'':4}  {'':<{width}}  -> {f.fix}\n")
    counts = {v: sum(1 for f in findings if f.verdict == v) for v in ("ok", "warn", "fail")}
    warn, fail = counts["warn"], counts["fail"]
    out.write(f"\n{counts['ok']} ok, {warn} warning{'' if warn == 1 else 's'}, "
              f"{fail} failure{'' if fail == 1 else 's'}\n")


def main(config_path: str | Path, *, timeout: float = 5.0, out: TextIO | None = None) -> int:
    """``iomt-agent doctor``: print the checklist; 0 = no failure, 1 = failure, 2 = bad config."""
    from agent.log import configure

    out = out or sys.stdout
    configure("error", "console")  # the MQTT probe's own log lines would clutter the list
    out.write(f"iomt-agent doctor: {config_path} (as {_who()})\n\n")
    findings, readable = run_checks(config_path, timeout=timeout)
    render(findings, out)
    return exit_code(findings, readable)


def exit_code(findings: list[Finding], config_readable: bool = True) -> int:
    if not config_readable:
        return EXIT_CONFIG
    return EXIT_FAIL if any(f.verdict == "fail" for f in findings) else EXIT_OK
