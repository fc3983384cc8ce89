"""The one TLS client context: what the MQTT connections and ``doctor``'s probe use.

TLS 1.2 or newer, the server's certificate verified against ``ca_file`` (or the system's
store) and its host name checked, and the client certificate and key where the config names
them (mutual TLS).
"""

from __future__ import annotations

import ssl

from agent.config import BrokerConfig


def client_context(cfg: BrokerConfig) -> ssl.SSLContext:
    """An SSL context for connecting to the broker ``cfg`` names. Raises OSError or
    ssl.SSLError when a file cannot be read or does not hold what it should."""
    ctx = ssl.create_default_context(cafile=str(cfg.ca_file) if cfg.ca_file else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cfg.cert_file:
        ctx.load_cert_chain(str(cfg.cert_file), str(cfg.key_file) if cfg.key_file else None)
    return ctx
