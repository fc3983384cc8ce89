"""The only module that imports paho: connections with persistent sessions and manual ack.

``Connection`` wraps one paho client: MQTT v5 (``clean_start=False`` and a session expiry)
or 3.1.1 (``clean_session=False``), QoS 1, automatic reconnect, optional manual ack of
received messages, and publish completion callbacks that carry the broker's verdict
(``Verdict``: delivered, unclaimed or refused, from the v5 PUBACK reason code; a 3.1.1 PUBACK
has none and always reads as delivered).

A connection that the broker keeps closing right after it connected (or closes with v5 reason
0x8E, "Session taken over") has another client with its client id; such a connection made
with ``yield_on_takeover`` stops reconnecting (``taken_over``) instead of knocking the other
client off in turn. With ``failover_urls`` (a cluster's nodes), a failed attempt or a dropped
connection moves to the next node; the client id, the persistent session and the publishes
paho still holds unacknowledged (sent again, DUP set) go with it.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.config import BrokerConfig
from agent.errors import AgentError
from agent.log import get_logger
from agent.thread_names import name_thread
from agent.transport.broker_url import Nodes, host_port
from agent.transport.hints import connect_hint, unreachable_reason
from agent.transport.tls import client_context
from agent.transport.topics import Topic

log = get_logger("agent.transport.mqtt")


class MqttError(AgentError):
    """Base of the MQTT errors."""


class ConnectFailed(MqttError):
    """The broker refused or could not be reached."""


class PublishFailed(MqttError):
    """paho refused to queue a publish."""


@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes
    qos: int
    mid: int
    retain: bool
    dup: bool


@dataclass(frozen=True)
class Refusal:
    """A refused CONNECT: the CONNACK's reason code and its text."""

    code: int
    text: str


@dataclass(frozen=True)
class Will:
    topic: Topic
    payload: bytes
    retain: bool = True


class Delivery(Enum):
    """What the broker did with a QoS 1 publish."""

    DELIVERED = "delivered"  # taken; v5: at least one subscription matched (3.1.1: taken)
    UNCLAIMED = "unclaimed"  # v5 reason 0x10: taken, but no subscription matched: discarded
    REFUSED = "refused"  # v5 reason >= 0x80 (e.g. not authorized)


NO_MATCHING_SUBSCRIBERS = 0x10
SESSION_TAKEN_OVER = 0x8E


@dataclass(frozen=True)
class Verdict:
    """The broker's answer to one publish: what it did, and its reason text."""

    delivery: Delivery
    reason: str

    @property
    def ok(self) -> bool:
        """The broker took the message (delivered or unclaimed)."""
        return self.delivery is not Delivery.REFUSED


PublishDone = Callable[[Verdict], None]

# Takeover seen without 0x8E (Mosquitto 2.0 closes the old connection without a DISCONNECT):
# this many connections that the broker closed within SHORT_LIVED_S of their CONNACK, within
# TAKEOVER_WINDOW_S. Two clients with one id knock each other off about once a second.
TAKEOVER_DROPS = 3
SHORT_LIVED_S = 10.0
TAKEOVER_WINDOW_S = 30.0
UNREACHABLE_LOG_EVERY_S = 300.0  # a broker that stays unreachable for the same reason


def describe_rc(rc: MQTTErrorCode | int) -> str:
    """A readable sentence for a paho return code."""
    return str(paho.error_string(int(rc)))


class Connection:
    """One broker connection. Callbacks run on paho's network thread: keep them short."""

    def __init__(
        self,
        cfg: BrokerConfig,
        client_id: str,
        *,
        name: str,
        subscriptions: tuple[Topic, ...] = (),
        on_message: Callable[[Message], None] | None = None,
        manual_ack: bool = False,
        will: Will | None = None,
        on_connected: Callable[[], None] | None = None,
        yield_on_takeover: bool = False,
        receive_maximum: int | None = None,
    ) -> None:
        self.cfg = cfg
        self._receive_maximum = receive_maximum  # MQTT 5: unacked messages the broker may send
        self.name = name
        self._subscriptions = subscriptions
        self._on_message_cb = on_message
        self._on_connected_cb = on_connected
        self._v5 = cfg.protocol == "5"
        self._connected = threading.Event()
        self._pending: dict[int, PublishDone] = {}
        self._early: dict[int, Verdict] = {}
        self._fire_and_forget: set[int] = set()
        self._pending_lock = threading.Lock()
        self.last_error: str | None = None
        # The broker's refusal of our CONNECT, kept until a CONNECT succeeds: the disconnect
        # that follows a refusal would overwrite last_error with a less telling reason.
        self.refusal: Refusal | None = None
        self.client_id = client_id
        self._nodes = Nodes(cfg.urls)
        self._yield_on_takeover = yield_on_takeover
        self._taken_over = threading.Event()
        self._connected_at: float | None = None
        self._short_drops: deque[float] = deque()
        self.takeover_evidence = ""
        self._unreachable: tuple[str, float, int] | None = None  # logged reason, when, tries
        self.client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=MQTTProtocolVersion.MQTTv5 if self._v5 else MQTTProtocolVersion.MQTTv311,
            clean_session=None if self._v5 else False,
            manual_ack=manual_ack,
        )
        self.client.reconnect_delay_set(min_delay=1, max_delay=30)
        self.client.max_inflight_messages_set(64)
        if cfg.username:
            password = None
            if cfg.password_file:
                password = cfg.password_file.read_text(encoding="utf-8").strip()
            self.client.username_pw_set(cfg.username, password)
        if cfg.tls:
            self.client.tls_set_context(client_context(cfg, name))
        if will is not None:
            self.client.will_set(str(will.topic), will.payload, qos=1, retain=will.retain)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        self.client.on_connect_fail = self._on_connect_fail

    @property
    def url(self) -> str:
        """The broker node this connection uses (or tries) now."""
        return self._nodes.current

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        """Connect in the background; paho reconnects by itself after a drop."""
        try:
            if self._v5:
                props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
                props.SessionExpiryInterval = self.cfg.session_expiry_s
                if self._receive_maximum is not None:
                    props.ReceiveMaximum = self._receive_maximum
                self.client.connect_async(*host_port(self.url), self.cfg.keepalive_s,
                                          clean_start=False, properties=props)
            else:  # 3.1.1: the persistent session comes from clean_session=False
                self.client.connect_async(*host_port(self.url), self.cfg.keepalive_s)
        except (OSError, ValueError) as exc:
            raise ConnectFailed(f"{self.name} broker {self.url}: {exc}") from exc
        self.client.loop_start()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def taken_over(self) -> bool:
        """Another client with our client id took the session (``yield_on_takeover``: we
        stopped reconnecting)."""
        return self._taken_over.is_set()

    def stop(self) -> None:
        """Disconnect cleanly (the will is not sent) and stop the network thread."""
        self.client.disconnect()
        self.client.loop_stop()
        self._connected.clear()

    def subscribe(self, topic: Topic) -> None:
        """Subscribe now (QoS 1) and after every reconnect; the broker sends the retained
        messages that match at once (agent.fleet reads them this way)."""
        self._subscriptions = (*self._subscriptions, topic)
        self.client.subscribe(str(topic), qos=1)  # not connected: on_connect subscribes

    def unsubscribe(self, topic: Topic) -> None:
        self._subscriptions = tuple(t for t in self._subscriptions if t != topic)
        self.client.unsubscribe(str(topic))

    def unsubscribe_all(self) -> None:
        for topic in self._subscriptions:
            self.client.unsubscribe(str(topic))
        self._subscriptions = ()

    # -- traffic -------------------------------------------------------------------------
    def publish(
        self,
        topic: Topic | str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        on_done: PublishDone | None = None,
    ) -> int:
        """Queue a publish; ``on_done`` runs when the broker has acknowledged it (QoS 1).

        Our lock is never held while calling into paho: paho calls ``on_publish`` with its
        own message lock held, so holding ours across ``client.publish`` could deadlock.
        """
        info = self.client.publish(str(topic), payload, qos=qos, retain=retain)
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            raise PublishFailed(f"{self.name}: publish refused: {describe_rc(info.rc)}")
        callback = on_done or _ignore
        with self._pending_lock:
            early = self._early.pop(info.mid, None)
            if qos == 0:
                # paho reports QoS 0 sends too; remember the mid so that report is dropped
                # instead of lingering as a stale verdict for a later QoS 1 message.
                if early is None:
                    self._fire_and_forget.add(info.mid)
            elif early is None:
                self._pending[info.mid] = callback
        if qos == 0:
            if info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
                callback(Verdict(Delivery.DELIVERED, "sent"))
            return int(info.mid)
        if early is not None:  # the PUBACK beat us to the registration
            callback(early)
        return int(info.mid)

    def ack(self, message: Message) -> None:
        """Acknowledge a received message (manual-ack mode)."""
        if message.qos > 0:
            self.client.ack(message.mid, message.qos)

    # -- paho callbacks (network thread) -------------------------------------------------
    def _on_connect(
        self, client: paho.Client, _userdata: object, flags: paho.ConnectFlags,
        reason: ReasonCode, _props: Properties | None,
    ) -> None:
        if reason.is_failure:
            self.last_error = f"connection refused: {reason}"
            if self.refusal is None:
                self.refusal = Refusal(int(reason.value), str(reason))
            log.warning("mqtt_connect_refused", broker=self.name, url=self.url,
                        reason=str(reason), fix=connect_hint(int(reason.value)))
            return
        self.refusal = None
        self._unreachable = None
        if threading.current_thread() is not threading.main_thread():
            name_thread(f"mqtt-{self.name}")  # paho's network thread: its ingest shows by name
        log.info("mqtt_connected", broker=self.name, url=self.url,
                 session_present=bool(flags.session_present))
        for topic in self._subscriptions:
            client.subscribe(str(topic), qos=1)
        self._connected_at = time.monotonic()
        self.last_error = None
        self._connected.set()
        if self._on_connected_cb is not None:
            self._on_connected_cb()

    def _on_connect_fail(self, client: paho.Client, _userdata: object) -> None:
        # paho calls this inside its `except OSError:`, so the error is the one in flight.
        reason = unreachable_reason(sys.exc_info()[1])
        self.last_error = f"cannot reach {self.url}: {reason}"
        told, at, tries = self._unreachable or ("", 0.0, 0)  # logged: first, new reason
        if reason != told or time.monotonic() - at >= UNREACHABLE_LOG_EVERY_S:
            log.warning("mqtt_unreachable", broker=self.name, url=self.url, reason=reason,
                        failed_attempts=tries + 1, retry="every 1-30 s until it answers")
            told, at = reason, time.monotonic()
        self._unreachable = (told, at, tries + 1)
        self._fail_over(client)

    def _fail_over(self, client: paho.Client) -> None:
        """The next reconnect goes to the cluster's next node. paho's host setter refuses
        while its state still reads connected (inside on_disconnect), so the fields are set."""
        url = self._nodes.advance()
        if url is not None:
            client._host, client._port = host_port(url)
            log.info("mqtt_failover", broker=self.name, to=url, after=self.last_error)

    def _on_disconnect(
        self, client: paho.Client, _userdata: object, _flags: paho.DisconnectFlags,
        reason: ReasonCode, _props: Properties | None,
    ) -> None:
        self._connected.clear()
        connected_at, self._connected_at = self._connected_at, None
        if not (reason.is_failure or int(reason.value) != 0):
            return
        self.last_error = f"disconnected: {reason}"
        log.warning("mqtt_disconnected", broker=self.name, reason=str(reason))
        now = time.monotonic()
        if connected_at is not None and now - connected_at < SHORT_LIVED_S:
            self._short_drops.append(now)
        while self._short_drops and now - self._short_drops[0] > TAKEOVER_WINDOW_S:
            self._short_drops.popleft()
        if int(reason.value) == SESSION_TAKEN_OVER:
            self._session_contested(client, f"the broker said: {reason}")
        elif len(self._short_drops) >= TAKEOVER_DROPS:
            self._session_contested(
                client, f"the broker closed the connection {len(self._short_drops)} times "
                f"within {TAKEOVER_WINDOW_S:.0f} s, each within {SHORT_LIVED_S:.0f} s of "
                "connecting")
        if not self._taken_over.is_set():
            self._fail_over(client)

    def _session_contested(self, client: paho.Client, evidence: str) -> None:
        """Another client connected with our client id (the broker closes the older
        connection): yield, or say so and go on."""
        self._short_drops.clear()
        self.takeover_evidence = evidence
        self.last_error = f"another client with client id {self.client_id} took over"
        if self._yield_on_takeover:
            self._taken_over.set()
            client.disconnect()  # in a callback: paho's loop ends instead of reconnecting
            return
        log.error("mqtt_session_contested", broker=self.name, client_id=self.client_id,
                  evidence=evidence, fix=f"another client probably uses client id "
                  f"{self.client_id}: give each process its own client_id (or stop the other)")

    def _on_message(self, _client: paho.Client, _userdata: object, msg: paho.MQTTMessage) -> None:
        if self._on_message_cb is None:
            return
        message = Message(
            msg.topic, bytes(msg.payload), msg.qos, msg.mid, bool(msg.retain), bool(msg.dup)
        )
        self._on_message_cb(message)

    def _on_publish(
        self, _client: paho.Client, _userdata: object, mid: int,
        reason: ReasonCode, _props: Properties | None,
    ) -> None:
        if reason.is_failure:
            verdict = Verdict(Delivery.REFUSED, str(reason))
        elif self._v5 and int(reason.value) == NO_MATCHING_SUBSCRIBERS:
            verdict = Verdict(Delivery.UNCLAIMED, str(reason))
        else:
            verdict = Verdict(Delivery.DELIVERED, str(reason))
        with self._pending_lock:
            if mid in self._fire_and_forget:
                self._fire_and_forget.discard(mid)
                return
            done = self._pending.pop(mid, None)
            if done is None:
                self._early[mid] = verdict
        if done is not None:
            done(verdict)


def _ignore(_verdict: Verdict) -> None:
    return None
