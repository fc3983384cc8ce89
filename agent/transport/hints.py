"""What to fix when a broker refuses our CONNECT (from the CONNACK's reason code) or cannot
be reached (from the socket or TLS error)."""

from __future__ import annotations

# CONNACK reason codes (MQTT 5; paho maps 3.1.1's return codes onto the same ones).
_CREDENTIALS = frozenset({0x86, 0x87, 0x8C})  # bad user name or password, not authorized,
# bad authentication method
_PROTOCOL = 0x84  # unsupported protocol version
_CLIENT_ID = 0x85  # client identifier not valid


def connect_hint(code: int, key: str = "this broker's") -> str:
    """What to fix for a refused CONNECT (``code``: its reason code); ``key`` names the
    config section (``edge``, ``cloud``) in the sentence."""
    section = f"{key}." if key.isidentifier() else f"{key} "
    if code in _CREDENTIALS:
        return f"check {section}username and {section}password_file (and the broker's ACL)"
    if code == _PROTOCOL:
        return f'the broker may not speak MQTT 5: set {section}protocol = "3.1.1"'
    if code == _CLIENT_ID:
        return f"the broker refused the client id: check {section}client_id and its rules"
    return "see the broker's log"


def unreachable_reason(exc: BaseException | None) -> str:
    """Why a connection attempt failed before any CONNACK, in words (``exc``: what paho's
    connect raised; None when it is not known)."""
    import socket
    import ssl

    if exc is None:
        return "connection failed"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS: the broker's certificate was refused ({exc.verify_message}): check " \
               "ca_file and that the URL's host name is one the certificate names"
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed ({getattr(exc, 'reason', None) or exc}): check ca_file, " \
               "cert_file, key_file and that the port speaks TLS"
    if isinstance(exc, socket.gaierror):
        return "host name not found (DNS): check the URL's host"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused: nothing listens on that port (is the broker running?)"
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return "timed out: a firewall or a wrong host or port"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror[:1].lower() + exc.strerror[1:]
    return f"{type(exc).__name__}: {exc}"
