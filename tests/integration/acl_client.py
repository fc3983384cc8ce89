"""A bare MQTT 5 client for the ACL tests: paho directly, so that every SUBACK and PUBACK
reason code is seen as the broker sent it (0x87: not authorized)."""

from __future__ import annotations

import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

NOT_AUTHORIZED = 0x87


@dataclass
class AclClient:
    """One connected identity. ``subscribe`` and ``publish`` return the broker's reason code."""

    client: paho.Client
    connack: dict[str, object] = field(default_factory=dict)  # CONNACK properties
    received: list[tuple[str, bytes]] = field(default_factory=list)
    _acks: dict[int, int] = field(default_factory=dict)
    _cond: threading.Condition = field(default_factory=threading.Condition)

    @classmethod
    def connect(cls, port: int, ca: Path, cert: Path | None, key: Path | None,
                name: str, timeout: float = 10) -> AclClient:
        """Connect, or raise ``ConnectionRefusedError`` saying what the broker did."""
        client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                             client_id=f"acl-{name}-{time.monotonic_ns()}",
                             protocol=MQTTProtocolVersion.MQTTv5)
        ctx = ssl.create_default_context(cafile=str(ca))
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if cert is not None:
            ctx.load_cert_chain(str(cert), str(key) if key else None)
        client.tls_set_context(ctx)
        self = cls(client)
        state: dict[str, object] = {}
        done = threading.Event()

        def on_connect(_c: paho.Client, _u: object, _f: object, rc: ReasonCode,
                       _p: Properties | None) -> None:
            state["rc"] = int(rc.value)
            if _p is not None:
                self.connack.update(_p.json())  # type: ignore[no-untyped-call]
            done.set()

        def on_disconnect(_c: paho.Client, _u: object, _f: object, rc: ReasonCode,
                          _p: Properties | None) -> None:
            state.setdefault("closed", str(rc))
            done.set()

        client.on_connect = on_connect
        client.on_disconnect = on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        try:
            client.connect("127.0.0.1", port, keepalive=30)
        except (ssl.SSLError, OSError) as exc:
            raise ConnectionRefusedError(f"TLS: {exc}") from None
        client.loop_start()
        if not done.wait(timeout) or state.get("rc") != 0:
            client.loop_stop()
            raise ConnectionRefusedError(f"no CONNACK 0: {state or 'no answer'}")
        return self

    # -- paho callbacks ------------------------------------------------------------------
    def _on_subscribe(self, _c: paho.Client, _u: object, mid: int,
                      codes: list[ReasonCode], _p: Properties | None) -> None:
        with self._cond:
            self._acks[mid] = int(codes[0].value)
            self._cond.notify_all()

    def _on_publish(self, _c: paho.Client, _u: object, mid: int, rc: ReasonCode,
                    _p: Properties | None) -> None:
        with self._cond:
            self._acks[mid] = int(rc.value)
            self._cond.notify_all()

    def _on_message(self, _c: paho.Client, _u: object, msg: paho.MQTTMessage) -> None:
        with self._cond:
            self.received.append((msg.topic, bytes(msg.payload)))
            self._cond.notify_all()

    def _wait(self, mid: int, timeout: float = 10) -> int:
        with self._cond:
            if not self._cond.wait_for(lambda: mid in self._acks, timeout):
                raise AssertionError(f"no ack for mid {mid}")
            return self._acks.pop(mid)

    # -- what the tests call -------------------------------------------------------------
    def subscribe(self, topic: str) -> int:
        """The SUBACK reason code: the granted QoS (1), or 0x87 when not authorized."""
        _rc, mid = self.client.subscribe(topic, qos=1)
        assert mid is not None
        return self._wait(mid)

    def publish(self, topic: str, payload: bytes = b"acl-probe", retain: bool = False) -> int:
        """The PUBACK reason code: 0 or 0x10 (no subscribers) when taken, 0x87 when not."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        return self._wait(info.mid)

    def wait_message(self, topic: str, timeout: float = 5) -> bool:
        with self._cond:
            return self._cond.wait_for(
                lambda: any(t == topic for t, _ in self.received), timeout)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
