"""Key rotation without downtime, with the running agent between two real Mosquitto
brokers: the cloud recipient key and the device signing key rotate mid-stream (the config
is pointed at the new keys and the agent reloaded with SIGHUP while scans flow); the
receiver, which holds both recipient keys and trusts both device keys, opens every result.
No key material appears in any log line of the agent or the receiver."""

from __future__ import annotations

import base64
import json
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from agent.cli import main
from agent.config import BrokerConfig
from agent.crypto import keys
from agent.crypto.seal import SUITES
from agent.demo.sample_series import build_series, load_demo_slab
from agent.transport.mqtt import Connection
from agent.transport.topics import Topics
from tests.conftest import Mosquitto
from tests.integration.harness import REFERENCE_BUNDLE, Recorder, spawn

pytestmark = pytest.mark.integration

N = 16  # scans in the stream
HELD = 3  # the last ones wait for the rotation, so some are sealed with the new keys
GAP_S = 0.08  # between two scans: the stream is still flowing when the reload comes


def _gateway(url: str, payloads: list[bytes], rotated: threading.Event) -> threading.Thread:
    """A scanner gateway publishing one scan every GAP_S seconds (QoS 1)."""
    conn = Connection(BrokerConfig(url=url), "gateway-stream", name="edge")
    conn.start()
    assert conn.wait_connected(10)
    topic = Topics("site-a", "node-1").scan("stream")

    def run() -> None:
        for i, payload in enumerate(payloads):
            if i == len(payloads) - HELD:
                rotated.wait(60)
            conn.publish(topic, payload, qos=1)
            time.sleep(GAP_S)
        time.sleep(1.0)  # the last PUBACKs
        conn.stop()

    thread = threading.Thread(target=run, name="gateway", daemon=True)
    thread.start()
    return thread


def _secrets(keydir: Path) -> list[str]:
    """Text forms of every private key and secret that could leak into a log."""
    found = []
    for path in keydir.glob("*.key"):
        body = path.read_text().splitlines()
        found += [line for line in body if not line.startswith("-----") and len(line) >= 16]
        if "IOMT HPKE" in body[0]:
            raw = keys.load_recipient_private_key(path).private_bytes_raw()
        elif "PRIVATE KEY" in body[0]:
            from cryptography.hazmat.primitives import serialization
            raw = keys.load_signing_key(path).private_bytes(
                serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                serialization.NoEncryption())
        else:  # the de-identification secret (hex)
            found.append(body[0].strip())
            continue
        found += [raw.hex()[:32], base64.b64encode(raw).decode()[:24]]
    return found


def test_cloud_and_device_keys_rotate_mid_stream_and_every_result_opens(
        tmp_path: Path, mosquitto_factory: Callable[[str], Mosquitto]) -> None:
    edge, cloud = mosquitto_factory("edge"), mosquitto_factory("cloud")
    node = tmp_path / "node"
    assert main(["init", str(node), "--edge-url", edge.url, "--cloud-url", cloud.url,
                 "--site", "site-a", "--device-id", "node-1",
                 "--bundle", str(REFERENCE_BUNDLE)]) == 0
    k = node / "keys"
    for kind, stem in (("recipient", "cloud-recipient-2"), ("signing", "device-signing-2")):
        assert main(["keys", kind, str(k / stem)]) == 0  # in-process: no interpreter start
    old_r = keys.load_recipient_public_key(k / "cloud-recipient.pub").key_id
    new_r = keys.load_recipient_public_key(k / "cloud-recipient-2.pub").key_id
    old_d = keys.signing_key_id(keys.load_verify_key(k / "device-signing.pub"))
    new_d = keys.signing_key_id(keys.load_verify_key(k / "device-signing-2.pub"))
    config = node / "agent.toml"
    text = config.read_text().replace('format = "auto"', 'format = "json"')
    # one runtime: `auto` would time every runtime x precision first, for nothing here
    text = text.replace('backend = "auto"', 'backend = "onnxruntime"')
    text = text.replace(
        'recipient_private_key = "keys/cloud-recipient.key"',
        'recipient_private_key = ["keys/cloud-recipient.key", "keys/cloud-recipient-2.key"]')
    text = text.replace(
        '"node-1" = "keys/device-signing.pub"',
        '"node-1" = ["keys/device-signing.pub", "keys/device-signing-2.pub"]')
    config.write_text(text)
    slab = load_demo_slab()
    payloads = build_series(np.concatenate([slab.t1] * -(-N // slab.t1.shape[0]))[:N])

    status = Recorder.start(cloud.url, "status", "iomt/site-a/node-1/status")
    receiver = spawn(["receive", "--config", str(config), "--out", str(tmp_path / "results"),
                      "--count", str(N), "--timeout", "180"], tmp_path / "receiver.log")
    receiver.wait_for('"mqtt_connected"')
    agent = spawn(["run", "--config", str(config)], tmp_path / "agent.log")
    agent.wait_for('"mqtt_connected"', 2)
    rotated = threading.Event()
    gateway = _gateway(edge.url, payloads, rotated)
    agent.wait_for('"slice_processed"', 3)  # the stream flows: rotate now
    config.write_text(config.read_text()
                      .replace('"keys/cloud-recipient.pub"', '"keys/cloud-recipient-2.pub"')
                      .replace('"keys/device-signing.key"', '"keys/device-signing-2.key"'))
    agent.proc.send_signal(signal.SIGHUP)
    agent.wait_for('"seal_keys_rotated"')
    rotated.set()
    gateway.join(60)
    assert receiver.proc.wait(180) == 0, receiver.text()[-3000:]
    assert agent.terminate() == 0

    # Every result was filed; each names the keys it was sealed and signed with.
    got = {e["message_id"]: (e["recipient_key_id"], e["signer_key_id"])
           for e in receiver.events("result_received")}
    assert len(got) == N
    assert len(list((tmp_path / "results").rglob("*.dcm"))) == N
    assert set(got.values()) <= {(old_r, old_d), (new_r, new_d)}  # never a mixed pair
    # Logged before the rotation: sealed with the old keys; those sent after it (and any
    # still in flight) with the new ones.
    lines = agent.text().splitlines()
    turn = next(i for i, line in enumerate(lines) if '"seal_keys_rotated"' in line)
    processed = [(i, json.loads(line)["message_id"]) for i, line in enumerate(lines)
                 if '"slice_processed"' in line]
    before = [m for i, m in processed if i < turn]
    assert len(before) >= 3 and all(got[m] == (old_r, old_d) for m in before)
    assert sum(1 for v in got.values() if v == (new_r, new_d)) >= HELD
    rotated = json.loads(lines[turn])
    assert (rotated["recipient_key_id"], rotated["signing_key_id"]) == (new_r, new_d)
    assert receiver.events("result_rejected") == []
    # The retained status names the keys in use: the old pair first, the new one at the end.
    seals = [json.loads(m.payload)["seal"] for m in status.wait("status", 2)]
    status.stop()
    ids = ("recipient_key_id", "signing_key_id")
    assert {k: seals[0][k] for k in ids} == {"recipient_key_id": old_r, "signing_key_id": old_d}
    assert {k: seals[-1][k] for k in ids} == {"recipient_key_id": new_r, "signing_key_id": new_d}
    assert {s["suite"] for s in seals} <= set(SUITES)  # and the suite it seals with
    # Key ids only: no private key or secret in any log line of either process.
    logs = agent.text() + receiver.text()
    secrets = _secrets(k)
    assert len(secrets) >= 5 * 3  # 4 key files (armor lines, hex, base64) + the deid secret
    assert not [s for s in secrets if s in logs]
