"""``doctor``'s check of each broker: name, TCP, TLS handshake, MQTT CONNECT with the configured
credentials (under a separate client id and session expiry 0, so the running agent's session
is neither taken over nor left behind)."""

from __future__ import annotations

import socket
import ssl
import time
from pathlib import Path

from agent.config import BrokerConfig
from agent.ops.findings import (
    Finding,
    fail,
    ok,
    unreadable_fix,
)
from agent.transport.tls import TLSFilesError, client_context

# -- brokers -----------------------------------------------------------------------------


def check_broker(role: str, cfg: BrokerConfig, client_id: str, timeout: float) -> list[Finding]:
    subject = f"{role} {cfg.url}"
    try:
        sock = socket.create_connection((cfg.host, cfg.port), timeout=timeout)
    except socket.gaierror as exc:
        return [fail("broker", subject, f"cannot resolve {cfg.host}: {exc.strerror}",
                      f"check {role}.url and the node's DNS (resolvectl status)")]
    except TimeoutError:
        return [fail("broker", subject, f"no answer from {cfg.host}:{cfg.port} within "
                      f"{timeout:g} s", "check the network path and firewalls to the broker")]
    except OSError as exc:
        return [fail("broker", subject, f"cannot connect to {cfg.host}:{cfg.port}: "
                      f"{exc.strerror or exc}", f"check {role}.url (host and port) and that "
                      "the broker is running")]
    detail = "TCP ok"
    with sock:
        if cfg.tls:
            try:
                ctx = client_context(cfg, role)
                with ctx.wrap_socket(sock, server_hostname=cfg.host) as tls:
                    peer = tls.getpeercert() or {}
                    detail = f"{tls.version()}, server certificate valid until " \
                             f"{peer.get('notAfter', '?')}"
            except ssl.SSLCertVerificationError as exc:
                return [fail("broker", subject, f"TLS: the broker's certificate does not "
                              f"verify: {exc.verify_message}",
                              f"set {role}.ca_file to the CA that signed the broker's "
                              "certificate, and use the host name the certificate names")]
            except TLSFilesError as exc:
                return [fail("broker", subject, str(exc), f"fix {role}.ca_file, cert_file "
                              "or key_file (PEM files; the key must match the certificate)")]
            except (ssl.SSLError, OSError) as exc:
                return [fail("broker", subject, f"TLS handshake failed: {exc}",
                              f"check {role}.ca_file, cert_file and key_file, and that the "
                              "port speaks TLS")]
    return [_mqtt_connect(role, cfg, client_id, timeout, detail)]


def _mqtt_connect(role: str, cfg: BrokerConfig, client_id: str, timeout: float,
                  detail: str) -> Finding:
    from agent.transport.hints import connect_hint
    from agent.transport.mqtt import Connection, MqttError

    subject = f"{role} {cfg.url}"
    # Session expiry 0: the doctor leaves no persistent session (MQTT 5) behind.
    probe_cfg = cfg.model_copy(update={"session_expiry_s": 0})
    try:
        conn = Connection(probe_cfg, client_id, name=f"{role}-doctor")
    except (OSError, ValueError) as exc:
        return fail("broker", subject, f"cannot use the configured credentials: {exc}",
                     unreadable_fix(Path(str(getattr(exc, "filename", "") or "the file"))))
    try:
        conn.start()
        deadline = time.monotonic() + timeout
        connected = False
        # A refused CONNECT sets last_error; paho would keep retrying until the deadline.
        while not connected and conn.last_error is None and time.monotonic() < deadline:
            connected = conn.wait_connected(0.05)
        refusal = conn.refusal
        error = f"connection refused: {refusal.text}" if refusal else conn.last_error
    except MqttError as exc:
        connected, error, refusal = False, str(exc), None
    finally:
        conn.stop()
    who = (f"as {cfg.username!r}" if cfg.username
           else "with the client certificate" if cfg.cert_file else "anonymously")
    if connected:
        return ok("broker", subject, f"{detail}; MQTT {cfg.protocol} CONNECT accepted {who}")
    if error:
        fix = connect_hint(refusal.code, role) if refusal else "see the broker's log"
        return fail("broker", subject, f"{detail}; MQTT CONNECT {who}: {error}", fix)
    return fail("broker", subject, f"{detail}; no CONNACK within {timeout:g} s",
                 f"check that {cfg.host}:{cfg.port} is an MQTT broker and {role}.protocol")
