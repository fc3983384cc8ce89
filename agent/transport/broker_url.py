"""What a broker URL may be: ``mqtt://`` or ``mqtts://``, a host, an optional port, nothing
else; and whether its host is loopback (plaintext is allowed there without asking)."""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

URL_FORMAT = ("expected mqtt://host[:port] or mqtts://host[:port] (the port defaults to 1883 "
              "for mqtt, 8883 for mqtts)")


def check_broker_url(value: str) -> str:
    """Return ``value`` if it is a usable broker URL, else raise ValueError saying why."""
    parts = urlsplit(value)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise ValueError(URL_FORMAT)
    try:
        port = parts.port
    except ValueError:
        raise ValueError("port must be a number from 1 to 65535") from None
    if port == 0:  # would silently fall back to the default port
        raise ValueError("port must be a number from 1 to 65535")
    if parts.path not in ("", "/"):
        raise ValueError("a broker URL has no path")
    if parts.username is not None or parts.query or parts.fragment:
        # They would be silently ignored; credentials belong in username/password_file.
        raise ValueError("a broker URL has no user, query or fragment: use username and "
                         "password_file for credentials")
    return value


def is_loopback(host: str) -> bool:
    """``localhost`` (and its subdomains, RFC 6761) or a loopback address (127/8, ::1).
    Name lookups are not made: another name is not loopback, whatever it resolves to."""
    name = host.lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name.strip("[]")).is_loopback
    except ValueError:
        return False
