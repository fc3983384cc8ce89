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


def check_failover_urls(values: list[str]) -> list[str]:
    """Each failover URL must be a usable broker URL; the error names the one that is not."""
    for i, value in enumerate(values):
        try:
            check_broker_url(value)
        except ValueError as exc:
            raise ValueError(f"failover URL {i + 1} ({value!r}): {exc}") from None
    return values


def host_port(url: str) -> tuple[str, int]:
    """The host and port a checked broker URL names (default port by scheme)."""
    parts = urlsplit(url)
    return parts.hostname or "", parts.port or (8883 if parts.scheme == "mqtts" else 1883)


class Nodes:
    """The nodes of one broker (``url``, then ``failover_urls``), taken in turn: ``current``
    is the one to connect to; ``advance`` moves on after a failure (``None`` with one node)."""

    def __init__(self, urls: list[str]) -> None:
        self._urls = list(urls)
        self._index = 0

    @property
    def current(self) -> str:
        return self._urls[self._index]

    def advance(self) -> str | None:
        if len(self._urls) < 2:
            return None
        self._index = (self._index + 1) % len(self._urls)
        return self.current
