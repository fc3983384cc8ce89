"""Every MQTT topic the agent uses, built in one place.

Site, device and group ids come from config and each must be a single topic level: no
``/``, no wildcards, no ``$`` prefix, no NUL, not empty. Nothing here ever carries PHI.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from agent.errors import AgentError

_LEVEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class TopicError(AgentError, ValueError):
    """A topic or topic level is not valid."""


def check_level(value: str, what: str = "topic level") -> str:
    """Return ``value`` if it is a safe single topic level, else raise TopicError."""
    if not _LEVEL.fullmatch(value):
        raise TopicError(
            f"{what} {value!r} is not a valid topic level: use 1-64 characters from "
            "A-Z a-z 0-9 _ . -, starting with a letter or digit"
        )
    return value


@dataclass(frozen=True)
class Topic:
    """A concrete topic name (no wildcards) or, with ``filter=True``, a subscription filter."""

    value: str
    filter: bool = False

    def __post_init__(self) -> None:
        if not self.value or len(self.value.encode()) > 65535 or "\x00" in self.value:
            raise TopicError(f"invalid topic {self.value!r}")
        levels = self.value.split("/")
        for i, level in enumerate(levels):
            if not self.filter and ("+" in level or "#" in level):
                raise TopicError(f"topic {self.value!r} must not contain wildcards")
            if self.filter and "#" in level and (level != "#" or i != len(levels) - 1):
                raise TopicError(f"'#' must be the last level of filter {self.value!r}")
            if self.filter and "+" in level and level != "+":
                raise TopicError(f"'+' must occupy a whole level in filter {self.value!r}")

    def __str__(self) -> str:
        return self.value

    def matches(self, topic: str) -> bool:
        """Whether concrete ``topic`` matches this filter (shared-subscription prefix ignored)."""
        pattern = self.value.split("/")
        if pattern[0] == "$share":
            pattern = pattern[2:]
        parts = topic.split("/")
        if topic.startswith("$") and pattern[0] in ("+", "#"):
            return False  # MQTT 4.7.2: wildcards in the first level never match $-topics
        for i, p in enumerate(pattern):
            if p == "#":
                return True
            if i >= len(parts) or (p != "+" and p != parts[i]):
                return False
        return len(parts) == len(pattern)


@dataclass(frozen=True)
class Topics:
    """The topics of one device at one site."""

    site: str
    device: str

    def __post_init__(self) -> None:
        check_level(self.site, "site")
        check_level(self.device, "device id")

    def scans_filter(self, shared: bool = False) -> Topic:
        """Subscription for incoming scans; ``shared`` spreads them over a site's agents."""
        base = f"iomt/{self.site}/scans/#"
        return Topic(f"$share/{self.site}/{base}" if shared else base, filter=True)

    def scan(self, source: str = "gateway") -> Topic:
        """Where a scanner gateway (or ``iomt-agent send``) publishes one instance."""
        return Topic(f"iomt/{self.site}/scans/{check_level(source, 'source')}")

    @property
    def results(self) -> Topic:
        return Topic(f"iomt/{self.site}/{self.device}/results")

    def results_filter(self, all_devices: bool = True) -> Topic:
        """What the cloud consumer subscribes to."""
        device = "+" if all_devices else self.device
        return Topic(f"iomt/{self.site}/{device}/results", filter=True)

    def errors_filter(self, all_devices: bool = True) -> Topic:
        """What the cloud consumer subscribes to for error reports."""
        device = "+" if all_devices else self.device
        return Topic(f"iomt/{self.site}/{device}/errors", filter=True)

    def status_filter(self, all_devices: bool = True) -> Topic:
        """Every device's retained status at this site (the cloud consumer, the operator)."""
        device = "+" if all_devices else self.device
        return Topic(f"iomt/{self.site}/{device}/status", filter=True)

    @property
    def status(self) -> Topic:
        return Topic(f"iomt/{self.site}/{self.device}/status")

    @property
    def errors(self) -> Topic:
        return Topic(f"iomt/{self.site}/{self.device}/errors")

    @property
    def receipts(self) -> Topic:
        """Cloud broker: the consumer confirms each result and error report it has filed
        (payload: JSON ``{"v": 1, "message_id": ...}``); the outbox keeps a row until then."""
        return Topic(f"iomt/{self.site}/{self.device}/receipts")

    def receipts_filter(self, all_devices: bool = True) -> Topic:
        """What the cloud consumer publishes to (every device of the site) in ACL terms."""
        device = "+" if all_devices else self.device
        return Topic(f"iomt/{self.site}/{device}/receipts", filter=True)

    @property
    def accepted(self) -> Topic:
        """Edge broker: the agent confirms each scan it has committed to its inbox (payload:
        JSON ``{"v": 1, "sha256": ...}``); a gateway resends a scan until it sees this."""
        return Topic(f"iomt/{self.site}/{self.device}/accepted")

    def accepted_filter(self, all_devices: bool = True) -> Topic:
        """What a scanner gateway subscribes to on the edge broker."""
        device = "+" if all_devices else self.device
        return Topic(f"iomt/{self.site}/{device}/accepted", filter=True)


def fleet(group: str, *rest: str) -> Topic:
    """Fleet update topics (used by model roll-out): ``iomt/fleet/{group}/...``."""
    parts = [check_level(group, "group"), *(check_level(p) for p in rest)]
    return Topic("iomt/fleet/" + "/".join(parts))


def fleet_filter(group: str | None = None) -> Topic:
    """Every fleet topic of one group (``iomt/fleet/{group}/#``), or of all groups."""
    middle = f"{check_level(group, 'group')}/" if group is not None else ""
    return Topic(f"iomt/fleet/{middle}#", filter=True)


def every_status() -> Topic:
    """The retained status of every device at every site (``fleet status`` reads them)."""
    return Topic("iomt/+/+/status", filter=True)


METADATA_ROLES = ("root", "timestamp", "snapshot", "targets")


@dataclass(frozen=True)
class FleetTopics:
    """The retained topics of one rollout group (docs/protocol.md, "Fleet updates"): TUF
    metadata under ``metadata/``, each target under ``targets/{sha256}/{name}`` (a JSON
    manifest) with its chunks at ``.../{index}``."""

    group: str

    def __post_init__(self) -> None:
        check_level(self.group, "group")

    @property
    def metadata_filter(self) -> Topic:
        """Every metadata message of the group (small: a node keeps them all)."""
        return Topic(f"iomt/fleet/{self.group}/metadata/#", filter=True)

    def metadata(self, role: str, version: int | None = None) -> Topic:
        """``metadata/timestamp``, or ``metadata/{role}/{version}`` (root, snapshot and
        targets are versioned: consistent snapshots)."""
        if role not in METADATA_ROLES:
            raise TopicError(f"unknown metadata role {role!r}")
        if version is None:
            return fleet(self.group, "metadata", role)
        if version < 1:
            raise TopicError(f"metadata version must be >= 1, got {version}")
        return fleet(self.group, "metadata", role, str(version))

    def target(self, sha256: str, name: str) -> Topic:
        """A target's manifest (its length and chunk count)."""
        return fleet(self.group, "targets", check_level(sha256, "target hash"), name)

    def target_chunk(self, sha256: str, name: str, index: int) -> Topic:
        return fleet(self.group, "targets", check_level(sha256, "target hash"), name,
                     str(index))

    def target_filter(self, sha256: str, name: str) -> Topic:
        """The manifest and every chunk of one target (``#`` matches its parent too)."""
        return Topic(f"{self.target(sha256, name)}/#", filter=True)
