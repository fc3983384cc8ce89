"""What to fix when a broker refuses our CONNECT, from the CONNACK's reason code."""

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
