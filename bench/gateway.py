"""C-STORE into MQTT: what one instance costs the gateway, broker up vs broker away.

Three ``iomt-agent gateway`` processes run side by side: A with a live Mosquitto (and a
subscriber, so each publish is acked as delivered) and ``keep_until_accepted = false``
(success after the PUBACK), C on the same broker with the default ``keep_until_accepted =
true`` (the spool's fsync'd commit, then the PUBACK; no agent confirms, so its rows stay),
B with its edge broker away (success after the spool's commit). dcmtk's ``storescu`` sends
the sample series (24 MR slices, 133 kB each) to A, C and B in turns, round by round, so
the machine's noise falls on all. Reported: median ms per instance (one association per
round, association set-up included) and the ratios C / A and B / A.

    python bench/gateway.py [--rounds 6] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(log: Path, needle: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while needle not in (log.read_text() if log.exists() else ""):
        if time.monotonic() > deadline:
            raise SystemExit(f"{log}: no {needle}:\n{log.read_text()[-2000:]}")
        time.sleep(0.05)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    storescu = shutil.which("storescu")
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if storescu is None or not Path(mosquitto).exists():
        raise SystemExit("needs dcmtk and mosquitto: make dcmtk mosquitto")
    agent = [sys.executable, "-m", "agent"]
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="bench-gateway-") as tmp_name:
        tmp = Path(tmp_name)
        try:
            broker_port = _port()
            procs.append(subprocess.Popen([mosquitto, "-p", str(broker_port)],
                                          stderr=subprocess.DEVNULL))
            time.sleep(0.5)
            # a subscriber, so the broker acks each publish as delivered (MQTT 5)
            procs.append(subprocess.Popen(
                [sys.executable, "-c", "import time, paho.mqtt.client as m;"
                 "c=m.Client(m.CallbackAPIVersion.VERSION2, protocol=m.MQTTv5);"
                 f"c.connect('127.0.0.1',{broker_port});c.subscribe('iomt/#',1);"
                 "c.loop_forever()"]))
            subprocess.run([*agent, "sample", str(tmp / "scans")], check=True,
                           capture_output=True)
            files = sorted(map(str, (tmp / "scans").glob("*.dcm")))
            ports = {}
            up = f"mqtt://127.0.0.1:{broker_port}"
            keep = {"A": "false", "C": "true", "B": "true"}
            for name, url in (("A", up), ("C", up), ("B", f"mqtt://127.0.0.1:{_port()}")):
                node = tmp / name
                subprocess.run([*agent, "init", str(node), "--edge-url", url, "--cloud-url", url,
                                "--site", "bench", "--device-id", f"gw-{name.lower()}"],
                               check=True, capture_output=True)
                ports[name] = _port()
                cfg = node / "agent.toml"
                cfg.write_text(cfg.read_text().replace('format = "auto"', 'format = "json"')
                               + f'\n[gateway]\nhost = "127.0.0.1"\nport = {ports[name]}\n'
                               'allowed_calling_ae_titles = ["BENCH"]\n'
                               f'keep_until_accepted = {keep[name]}\n')
                log = tmp / f"{name}.log"
                with log.open("wb") as f:
                    procs.append(subprocess.Popen([*agent, "gateway", "--config", str(cfg)],
                                                  stdout=f, stderr=subprocess.STDOUT))
                _wait(log, "gateway_listening")
            _wait(tmp / "A.log", "mqtt_connected")
            _wait(tmp / "C.log", "mqtt_connected")
            per: dict[str, list[float]] = {"A": [], "C": [], "B": []}
            for _ in range(args.rounds):
                for name in ("A", "C", "B"):
                    t0 = time.perf_counter()
                    out = subprocess.run([storescu, "-aet", "BENCH", "-aec", "IOMT-GW",
                                          "127.0.0.1", str(ports[name]), *files],
                                         capture_output=True, text=True, check=False)
                    dt = time.perf_counter() - t0
                    if out.returncode != 0:
                        raise SystemExit(f"storescu to {name}: {out.stdout}{out.stderr}")
                    per[name].append(dt / len(files) * 1000)
            outcomes = {n: (tmp / f"{n}.log").read_text().count(f'"outcome": "{o}"')
                        for n, o in (("A", "published"), ("C", "published"),
                                     ("B", "spooled"))}
        finally:
            for p in reversed(procs):
                p.terminate()
                p.wait(20)
    med = {n: statistics.median(v) for n, v in per.items()}
    print(f"{'gateway':<34} {'ms/instance (median)':>22} {'instances':>10}")
    print(f"{'A broker up: success after PUBACK':<34} {med['A']:>22.1f} {outcomes['A']:>10}")
    print(f"{'C up, kept: spool commit + PUBACK':<34} {med['C']:>22.1f} {outcomes['C']:>10}")
    print(f"{'B broker away: after spool commit':<34} {med['B']:>22.1f} {outcomes['B']:>10}")
    print(f"ratio C / A: {med['C'] / med['A']:.2f}, B / A: {med['B'] / med['A']:.2f} "
          f"({args.rounds} rounds of {len(files)}; {os.cpu_count()} CPUs)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rounds": args.rounds, "instances": len(files),
                                         "ms_per_instance": per, "median": med,
                                         "outcomes": outcomes}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
