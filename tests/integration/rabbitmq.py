"""A real three-node RabbitMQ cluster (Debian's rabbitmq-server, MQTT plugin) on loopback.

Each node has its own name, ports (AMQP, Erlang distribution, MQTT) and data directory under
the test's tmp dir; the nodes share one Erlang cookie (``$HOME/.erlang.cookie``) and their own
epmd on a free port, so nothing here touches a system RabbitMQ. Nodes 2 and 3 join node 1
with ``rabbitmqctl join_cluster``. MQTT subscription queues of persistent sessions are quorum
queues (``durable_queue_type``, set in advanced.config: RabbitMQ 3.10's schema has no key
for it), replicated on all three nodes.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

RABBIT_BIN = Path("/usr/lib/rabbitmq/bin")
COOKIE = "IOMTTESTCLUSTERCOOKIE"


def rabbitmq_installed() -> bool:
    return (RABBIT_BIN / "rabbitmq-server").exists() and shutil.which("erl") is not None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Node:
    name: str  # rabbitN@localhost
    mqtt_port: int
    amqp_port: int
    dist_port: int
    base: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.mqtt_port}"


class Cluster:
    """Three RabbitMQ nodes clustered on loopback; ``stop()`` ends them all."""

    def __init__(self, root: Path, size: int = 3) -> None:
        self.root = root
        self.home = root / "home"
        self.home.mkdir(parents=True, exist_ok=True)
        cookie = self.home / ".erlang.cookie"
        cookie.write_text(COOKIE)
        cookie.chmod(0o400)
        (root / "enabled_plugins").write_text("[rabbitmq_mqtt].\n")
        self.epmd_port = free_port()
        self.nodes = [Node(f"iomt{i}@localhost", free_port(), free_port(), free_port(),
                           root / f"node{i}") for i in range(1, size + 1)]

    def _env(self, node: Node | None = None) -> dict[str, str]:
        env = dict(os.environ, HOME=str(self.home), ERL_EPMD_PORT=str(self.epmd_port))
        if node is not None:
            env.update(
                RABBITMQ_NODENAME=node.name, RABBITMQ_NODE_PORT=str(node.amqp_port),
                RABBITMQ_DIST_PORT=str(node.dist_port),
                RABBITMQ_MNESIA_BASE=str(node.base / "mnesia"),
                RABBITMQ_LOG_BASE=str(node.base / "log"),
                RABBITMQ_PID_FILE=str(node.base / "pid"),
                RABBITMQ_CONFIG_FILE=str(node.base / "rabbitmq.conf"),
                RABBITMQ_ADVANCED_CONFIG_FILE=str(node.base / "advanced.config"),
                RABBITMQ_ENABLED_PLUGINS_FILE=str(self.root / "enabled_plugins"))
        return env

    def ctl(self, node: Node, *args: str, timeout: float = 120) -> str:
        r = subprocess.run([str(RABBIT_BIN / "rabbitmqctl"), "-n", node.name, *args],
                           env=self._env(), capture_output=True, text=True, timeout=timeout,
                           check=False)
        if r.returncode != 0:
            raise AssertionError(f"rabbitmqctl {' '.join(args)} on {node.name}: "
                                 f"{r.stdout}\n{r.stderr}")
        return r.stdout

    def start_node(self, node: Node) -> None:
        node.base.mkdir(parents=True, exist_ok=True)
        (node.base / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{node.amqp_port}\n"
            f"mqtt.listeners.tcp.default = 127.0.0.1:{node.mqtt_port}\n"
            "mqtt.allow_anonymous = true\n"
            "loopback_users = none\n"
            "log.console = true\nlog.console.level = warning\nlog.file = false\n")
        (node.base / "advanced.config").write_text(
            "[{rabbitmq_mqtt, [{durable_queue_type, quorum}]}].\n")
        with (node.base / "server.log").open("ab") as log:
            node.proc = subprocess.Popen([str(RABBIT_BIN / "rabbitmq-server")],
                                         env=self._env(node), stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def await_node(self, node: Node, timeout: float = 180) -> None:
        """Until the node's MQTT listener takes connections (the plugin starts last)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", node.mqtt_port), timeout=0.5).close()
                return
            except OSError:
                if node.proc is not None and node.proc.poll() is not None:
                    break
                time.sleep(0.2)
        log = (node.base / "server.log").read_text(errors="replace")[-3000:]
        raise AssertionError(f"{node.name}: MQTT listener not up:\n{log}")

    def start(self) -> None:
        for node in self.nodes:
            self.start_node(node)
        for node in self.nodes:
            self.await_node(node)
        first = self.nodes[0]
        for node in self.nodes[1:]:
            self.ctl(node, "stop_app")
            self.ctl(node, "join_cluster", first.name)
            self.ctl(node, "start_app")
            self.await_node(node)

    def running_nodes(self, via: Node) -> list[str]:
        out = self.ctl(via, "eval", "rabbit_nodes:all_running().")
        return sorted(n.strip(" '[]\n") for n in out.split(","))

    def queues(self, via: Node) -> str:
        return self.ctl(via, "list_queues", "name", "type", "messages", "--no-table-headers")

    def kill(self, node: Node) -> None:
        """SIGKILL the node's whole process group (the Erlang VM and its helpers)."""
        if node.proc is not None and node.proc.poll() is None:
            os.killpg(node.proc.pid, signal.SIGKILL)
            node.proc.wait(10)

    def stop(self) -> None:
        for node in self.nodes:
            if node.proc is not None and node.proc.poll() is None:
                os.killpg(node.proc.pid, signal.SIGTERM)
        for node in self.nodes:
            if node.proc is None:
                continue
            try:
                node.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(node.proc.pid, signal.SIGKILL)
                node.proc.wait(10)
        epmd = shutil.which("epmd")
        if epmd:
            subprocess.run([epmd, "-kill"], env=self._env(), capture_output=True, check=False,
                           timeout=10)
