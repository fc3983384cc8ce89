"""The script the agent is compared with: what a user writes in an afternoon.

One paho callback does everything on the network thread: pydicom decode, percentile
normalisation, scipy zoom to the model's matrix, onnxruntime fp32, scipy zoom back, and a
QoS 1 publish of the raw uint16 array to the cloud broker. No durability (paho acks the
scan when the callback returns, whatever happened), no sealing, no DICOM output, no
contract checks. It deliberately uses the libraries' defaults (onnxruntime picks its own
thread count), as such a script would.

It reads the normalisation and output scale from the bundle's ``bundle.json`` so that it
computes the same thing as the agent, and serves the bundle's fp32 reference model
(``model.fp32.onnx``). Prints ``ready`` on stdout once subscribed; SIGTERM stops it.

    python bench/naive_script.py --edge mqtt://127.0.0.1:1883 --cloud mqtt://127.0.0.1:1884 \
        --bundle models/t1w-to-t2w-lite --scans 'naive/scans/#' --results naive/results
"""

from __future__ import annotations

import argparse
import io
import json
import signal
import sys
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import onnxruntime as ort
import paho.mqtt.client as mqtt
import pydicom
from paho.mqtt.enums import CallbackAPIVersion
from scipy import ndimage


class NaiveTranslator:
    """The whole per-slice job of the script, in one function."""

    def __init__(self, bundle_dir: Path) -> None:
        meta = json.loads((bundle_dir / "bundle.json").read_text())
        norm = meta["input"]["normalisation"]
        self.percentile = float(norm["percentile"])
        self.clip_max = float(norm["clip_max"])
        self.scale = float(meta["output"]["scale"])
        self.matrix = tuple(int(v) for v in meta["input"]["shape"])
        self.session = ort.InferenceSession(str(bundle_dir / meta["reference"]["path"]),
                                            providers=["CPUExecutionProvider"])
        self.input_name = meta["input"].get("tensor_name", "input")

    def translate(self, payload: bytes) -> bytes:
        ds = pydicom.dcmread(io.BytesIO(payload))
        pixels = ds.pixel_array.astype(np.float32)
        positive = pixels[pixels > 0]
        scale = float(np.percentile(positive, self.percentile)) if positive.size else 1.0
        x = np.clip(pixels / scale, 0.0, self.clip_max)
        zoom_in = (self.matrix[0] / x.shape[0], self.matrix[1] / x.shape[1])
        x = ndimage.zoom(x, zoom_in, order=1)
        y = self.session.run(None, {self.input_name: x[None, None].astype(np.float32)})[0][0, 0]
        zoom_out = (pixels.shape[0] / y.shape[0], pixels.shape[1] / y.shape[1])
        y = ndimage.zoom(y, zoom_out, order=1)
        out = np.clip(y * self.scale, 0, 65535).astype(np.uint16)
        return bytes(out.tobytes())


def client(url: str, client_id: str) -> mqtt.Client:
    parts = urlsplit(url)
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
    c.connect(parts.hostname or "127.0.0.1", parts.port or 1883)
    return c


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--edge", required=True, help="broker URL the scans come from")
    ap.add_argument("--cloud", required=True, help="broker URL the results go to")
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--scans", required=True, help="topic filter to subscribe to")
    ap.add_argument("--results", required=True, help="topic to publish results to")
    args = ap.parse_args()

    translator = NaiveTranslator(args.bundle)
    cloud = client(args.cloud, "naive-cloud")
    cloud.loop_start()
    edge = client(args.edge, "naive-edge")
    subscribed = threading.Event()

    def on_message(_c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            cloud.publish(args.results, translator.translate(bytes(msg.payload)), qos=1)
        except Exception as exc:  # a bad scan must not kill the script
            print(f"failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)

    def on_subscribe(*_a: Any) -> None:
        subscribed.set()

    edge.on_message = on_message
    edge.on_subscribe = on_subscribe
    edge.subscribe(args.scans, qos=1)
    edge.loop_start()
    subscribed.wait(10)
    print("ready", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    while not stop.wait(0.5):  # wake up for the signal handler
        pass
    edge.loop_stop()
    edge.disconnect()
    cloud.loop_stop()
    cloud.disconnect()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
