"""The one configuration schema (TOML), with errors that name the key path.

Relative paths in the file are resolved against the directory that holds the file, so a
directory written by ``iomt-agent init`` can be moved as a whole.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from agent.config_budgets import DecodeSection, StorageSection
from agent.config_deid import DeidSection
from agent.config_delivery import DeliverySection
from agent.config_domain import DomainSection
from agent.config_gateway import GatewaySection
from agent.config_io import describe_errors, read_text, validate_toml
from agent.config_model import ModelSection
from agent.config_receiver import ReceiverSection
from agent.errors import AgentError
from agent.transport.broker_url import check_broker_url, check_failover_urls, is_loopback
from agent.transport.topics import TopicError, check_level

__all__ = ["BrokerConfig", "Config", "ConfigError", "FleetSection", "ModelSection", "Strict",
           "describe_errors", "load_config", "parse_config", "read_text", "validate_toml"]

MIB = 1024 * 1024
CREDENTIALS_PREFIX = "${CREDENTIALS_DIRECTORY}"


def expand_credentials(path: Path, config_dir: Path) -> Path:
    """``${CREDENTIALS_DIRECTORY}/NAME``: systemd's private copy of a LoadCredential=
    secret inside the service; ``<config dir>/credentials/NAME`` outside it (the doctor, a
    manual run as root), which is where systemd/install.sh keeps the originals."""
    text = str(path)
    if not text.startswith(CREDENTIALS_PREFIX):
        return path
    directory = os.environ.get("CREDENTIALS_DIRECTORY") or str(config_dir / "credentials")
    return Path(directory + text[len(CREDENTIALS_PREFIX):])


class ConfigError(AgentError):
    """The configuration cannot be used. ``problems`` holds one line per bad key."""

    what = "configuration"  # what kind of file, for ``render``

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: " + "; ".join(problems))

    def render(self) -> str:
        lines = [f"invalid {self.what} in {self.source}:"]
        lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)


class Strict(BaseModel):
    """A schema section: unknown keys are errors, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _level(value: str) -> str:
    try:
        return check_level(value)
    except TopicError as exc:
        raise ValueError(str(exc)) from None


class BrokerConfig(Strict):
    """One MQTT broker connection."""

    url: str = Field(
        title="Broker URL",
        description="mqtt://host[:port] (plain, default port 1883) or mqtts://host[:port] "
        "(TLS, default port 8883)",
    )
    failover_urls: list[str] = Field(
        default_factory=list, max_length=15,
        title="Failover URLs",
        description="Further nodes of the same broker cluster (same scheme as url), tried in "
        "turn after url when a connection fails or drops; one client id and session for all",
    )
    protocol: Literal["5", "3.1.1"] = Field(
        "5",
        title="MQTT protocol version",
        description='"5" for real brokers; "3.1.1" for brokers without v5 (e.g. amqtt)',
    )
    client_id: str | None = Field(
        None,
        title="Client id",
        description="Stable client id (persistent session); default iomt-<site>-<device>-<role>",
    )
    username: str | None = Field(None, title="Username", description="MQTT username")
    password_file: Path | None = Field(
        None, title="Password file", description="File holding the MQTT password"
    )
    ca_file: Path | None = Field(
        None, title="CA bundle", description="CA certificates for mqtts (default: system store)"
    )
    cert_file: Path | None = Field(
        None, title="Client certificate", description="PEM client certificate for mutual TLS"
    )
    key_file: Path | None = Field(
        None, title="Client key", description="PEM private key for the client certificate"
    )
    keepalive_s: int = Field(30, ge=5, le=3600, title="Keepalive", description="Seconds")
    session_expiry_s: int = Field(
        7 * 24 * 3600,
        ge=0,
        title="Session expiry",
        description="How long the broker keeps our session and queued QoS 1 messages (v5)",
    )

    allow_plaintext: bool = Field(
        False, title="Allow plaintext",
        description="Permit mqtt:// (no TLS) to a host that is not loopback; the agent logs "
        "a warning at start and doctor warns",
    )

    _url = field_validator("url")(check_broker_url)

    @field_validator("protocol", mode="before")
    @classmethod
    def _protocol_is_text(cls, value: object) -> object:
        if isinstance(value, int | float) and not isinstance(value, bool):
            raise ValueError(f'a number: write it in quotes, protocol = "{value:g}" '
                             '(the versions are "5" and "3.1.1")')
        return value
    _failover = field_validator("failover_urls")(check_failover_urls)

    @model_validator(mode="after")
    def _plaintext_only_on_loopback(self) -> BrokerConfig:
        for url in self.urls:
            parts = urlsplit(url)
            if parts.scheme != urlsplit(self.url).scheme:
                raise ValueError(f"failover URL {url} and url {self.url} differ in scheme: "
                                 "the nodes of one cluster share one TLS setting")
            if (parts.scheme == "mqtt" and not self.allow_plaintext
                    and not is_loopback(parts.hostname or "")):
                raise ValueError(
                    f"{url} is plaintext MQTT to a host that is not loopback: use mqtts:// "
                    "(with ca_file, cert_file, key_file; `iomt-agent certs init` makes a "
                    "development PKI), or set allow_plaintext = true in this section")
        return self

    @property
    def urls(self) -> list[str]:
        """Every node of the broker: ``url`` first, then ``failover_urls``."""
        return [self.url, *self.failover_urls]

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        parts = urlsplit(self.url)
        return parts.port or (8883 if parts.scheme == "mqtts" else 1883)

    @property
    def tls(self) -> bool:
        return urlsplit(self.url).scheme == "mqtts"


class AgentSection(Strict):
    site: Annotated[str, Field(title="Site id", description="Topic level naming the hospital site")]
    device_id: Annotated[
        str, Field(title="Device id", description="Topic level naming this edge node")
    ]
    state_dir: Path = Field(
        Path("state"), title="State directory", description="Inbox/outbox databases live here"
    )
    shared_subscription: bool = Field(
        False,
        title="Shared subscription",
        description="Share the site's scans among several agents ($share/<site>/...)",
    )

    _site = field_validator("site", "device_id")(_level)


class LimitsSection(Strict):
    max_payload_bytes: int = Field(
        64 * MIB, ge=1024, title="Payload cap", description="Larger scans are refused"
    )
    pixel_budget: int = Field(
        4096 * 4096,
        ge=1,
        title="Pixel budget",
        description="Refuse instances with rows x columns x frames above this, before decoding",
    )
    inbox_max_bytes: int = Field(
        2048 * MIB,
        ge=MIB,
        title="Inbox cap",
        description="When full, new scans are not acked (the broker keeps them) until it drains",
    )
    outbox_max_bytes: int = Field(
        2048 * MIB,
        ge=MIB,
        title="Outbox cap",
        description="When full, processing pauses until the cloud broker takes results",
    )


class SeriesSection(Strict):
    """Series assembly for 2.5D models (bundles with input.context_slices > 0)."""

    idle_timeout_s: float = Field(
        30.0, gt=0, le=3600, title="Series idle timeout",
        description="A series with no new slice for this long is complete: its slices still "
        "waiting for neighbours go with edge padding",
    )
    max_open: int = Field(
        8, ge=1, le=256, title="Open series",
        description="Series assembled at once; a new one closes the least recently active "
        "(logged as series_limit)",
    )
    max_slices: int = Field(
        2048, ge=1, le=65536, title="Slices per series",
        description="More slices in one series are refused (error reason series_too_large)",
    )


AeadSetting = Literal["auto", "aes-256-gcm", "chacha20-poly1305"]  # agent.crypto.aead_choice


class SealSection(Strict):
    recipient_public_key: Path = Field(
        title="Recipient public key", description="The cloud's HPKE public key")
    device_signing_key: Path = Field(
        title="Device signing key", description="This node's Ed25519 private key (0600)")
    aead: AeadSetting = Field(
        "auto", title="Envelope cipher",
        description="The AEAD that encrypts results (named in each envelope's suite; the "
        "receiver opens both). auto: AES-256-GCM where the CPU has AES instructions, else "
        "ChaCha20-Poly1305, several times faster in software (a Raspberry Pi 4)")
    envelope_version: Literal[1, 2] = Field(
        1, title="Envelope version",
        description="1: the signature covers the whole envelope (every receiver opens it). "
        "2: it covers the envelope's SHA-256: sealing 133 kB took 0.41-0.46 against "
        "0.88-1.01 ms on a 2.1 GHz Xeon (SHA-256 instructions; a Pi 4 has none and gains "
        "little); receivers from this release on open both: upgrade them first")


class LogSection(Strict):
    level: Literal["debug", "info", "warning", "error"] = Field(
        "info", title="Log level", description="Minimum level")
    format: Literal["auto", "console", "json"] = Field(
        "auto", title="Log format", description="auto: console on a TTY, JSON lines otherwise")


class FleetSection(Strict):
    """Signed model updates from the cloud broker (agent.fleet); without it, none."""

    group: str = Field(title="Fleet group", description="Topic level of this node's rollout "
                       "group: updates come from iomt/fleet/<group>/... on the cloud broker")
    root: Path = Field(title="Trusted root", description="The fleet's TUF root.json (`iomt-agent "
                       "fleet init-repo` writes it); newer roots come signed by the fleet")
    check_interval_s: float = Field(300.0, ge=1, le=86400, title="Check interval",
                                    description="Seconds between checks besides each new "
                                    "timestamp message")
    download_stall_s: float = Field(20.0, gt=0, le=3600, title="Download stall limit",
                                    description="Seconds without a chunk before a target "
                                    "download is given up (download_stalled; retried later)")
    rollback_window: int = Field(8, ge=1, le=10000, title="Rollback window",
                                 description="Scans watched after an activation")
    rollback_failure_rate: float = Field(
        0.5, ge=0, lt=1, title="Rollback failure rate",
        description="More failed scans than this share of the window: roll back by itself")

    _group = field_validator("group")(_level)


class Config(Strict):
    agent: AgentSection = Field(title="Agent", description="Identity and state")
    edge: BrokerConfig = Field(title="Edge broker", description="Where scans arrive")
    cloud: BrokerConfig = Field(title="Cloud broker", description="Where results go")
    model: ModelSection = Field(title="Model", description="The bundle to serve")
    seal: SealSection = Field(title="Sealing", description="Keys for sealed results")
    limits: LimitsSection = Field(
        default_factory=lambda: LimitsSection(), title="Limits", description="Resource caps"
    )
    series: SeriesSection = Field(
        default_factory=lambda: SeriesSection(), title="Series assembly",
        description="How 2.5D models gather a slice's neighbours",
    )
    log: LogSection = Field(
        default_factory=lambda: LogSection(), title="Logging", description="Level and format"
    )
    deid: DeidSection = Field(
        default_factory=lambda: DeidSection(), title="De-identification",
        description="PS3.15 Annex E profile applied before sealing (on by default)",
    )
    delivery: DeliverySection = Field(
        default_factory=lambda: DeliverySection(), title="Delivery",
        description="End-to-end receipts before the outbox forgets a result")
    storage: StorageSection = Field(
        default_factory=lambda: StorageSection(), title="Full stores",
        description="What happens when the outbox or the disk is full")
    decode: DecodeSection = Field(
        default_factory=lambda: DecodeSection(), title="Decoder process",
        description="Memory and time budget of the process that decodes scans")
    domain: DomainSection = Field(
        default_factory=lambda: DomainSection(), title="Domain shift",
        description="What to do with a slice outside the model's training domain")
    receiver: ReceiverSection | None = Field(
        None, title="Receiver", description="Keys for `iomt-agent receive` (the cloud side)")
    fleet: FleetSection | None = Field(
        None, title="Fleet updates", description="Model updates over MQTT, verified with TUF")
    gateway: GatewaySection | None = Field(
        None, title="DICOM gateway", description="`iomt-agent gateway`: C-STORE into MQTT")

    def client_id(self, role: str) -> str:
        """The MQTT client id of a connection, the key of its persistent session: the
        config's ``<role>.client_id`` or ``iomt-{site}-{device}-{role}`` (``edge``,
        ``cloud``); for ``receiver``, ``receiver.client_id`` or
        ``iomt-{site}-cloud-receiver``."""
        if role == "receiver":
            chosen = self.receiver.client_id if self.receiver else None
            return chosen or f"iomt-{self.agent.site}-cloud-receiver"
        broker: BrokerConfig | None = getattr(self, role) if role in ("edge", "cloud") else None
        own = broker.client_id if broker else None  # "fleet": its own connection, no key
        return own or f"iomt-{self.agent.site}-{self.agent.device_id}-{role}"

    def resolve(self, base: Path) -> Config:
        """Return a copy whose relative paths are taken relative to ``base``."""

        def fix_path(p: Path) -> Path:
            p = expand_credentials(p, base)
            return p if p.is_absolute() else (base / p).resolve()

        def fix(p: Path | None) -> Path | None:
            return None if p is None else fix_path(p)

        def broker(b: BrokerConfig) -> BrokerConfig:
            return b.model_copy(
                update={
                    k: fix(getattr(b, k))
                    for k in ("password_file", "ca_file", "cert_file", "key_file")
                }
            )

        receiver = self.receiver and self.receiver.resolved(fix_path)
        return self.model_copy(
            update={
                "agent": self.agent.model_copy(update={"state_dir": fix(self.agent.state_dir)}),
                "edge": broker(self.edge),
                "cloud": broker(self.cloud),
                "model": self.model.model_copy(update={"bundle": fix(self.model.bundle)}),
                "seal": self.seal.model_copy(
                    update={
                        "recipient_public_key": fix(self.seal.recipient_public_key),
                        "device_signing_key": fix(self.seal.device_signing_key),
                    }
                ),
                "receiver": receiver,
                "deid": self.deid.model_copy(update={"secret_file": fix(self.deid.secret_file)}),
                "fleet": self.fleet and self.fleet.model_copy(
                    update={"root": fix(self.fleet.root)}),
            }
        )


def parse_config(text: str, source: str = "<string>", base: Path | None = None) -> Config:
    """Parse TOML text into a Config, or raise ConfigError listing every bad key path."""
    config = validate_toml(text, source, Config, ConfigError, "README 'Configuration'")
    return config.resolve(base) if base is not None else config


def load_config(path: str | Path) -> Config:
    """Read and validate a config file; relative paths resolve against its directory."""
    path = Path(path)
    return parse_config(read_text(path, ConfigError), str(path), path.resolve().parent)
