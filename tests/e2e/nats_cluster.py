"""A three-node NATS JetStream cluster on loopback (real nats-server processes).

Each node has its own client port, cluster (route) port and store; every node names the
other two as routes, so the cluster forms whichever starts first. JetStream elects a meta
leader once two of the three agree; ``wait_ready`` waits for that.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import nats
from nats.js.errors import APIError, ServiceUnavailableError

from mailgrid import bus
from mailgrid.natsd import free_port, nats_server_binary

CLUSTER = "mailgrid-test"


@dataclass
class Node:
    name: str
    port: int
    route_port: int
    http_port: int
    store_dir: Path
    process: subprocess.Popen[bytes] | None = field(default=None)

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def config(self, routes: list[int]) -> str:
        route_urls = ", ".join(f"nats-route://127.0.0.1:{p}" for p in routes)
        return (f"server_name: {self.name}\n"
                f"listen: 127.0.0.1:{self.port}\n"
                f"http: 127.0.0.1:{self.http_port}\n"
                "max_payload: 8MB\n"
                "jetstream {\n"
                f'  store_dir: "{self.store_dir}"\n'
                "  sync_interval: always\n"
                "}\n"
                "cluster {\n"
                f"  name: {CLUSTER}\n"
                f"  listen: 127.0.0.1:{self.route_port}\n"
                f"  routes: [{route_urls}]\n"
                "}\n")

    def start(self, routes: list[int]) -> None:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        conf = self.store_dir / "nats.conf"
        conf.write_text(self.config(routes))
        with (self.store_dir / "nats.log").open("ab") as log:
            self.process = subprocess.Popen(
                [nats_server_binary(), "-c", str(conf)], stdout=log,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def stop(self) -> None:
        """SIGTERM (lame-duck free shutdown), as an operator stopping a node would."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def client_count(self) -> int:
        """Clients connected to this node now (its monitoring endpoint /connz)."""
        reply = httpx.get(f"http://127.0.0.1:{self.http_port}/connz", timeout=5)
        return int(reply.json()["num_connections"])

    def log(self) -> str:
        path = self.store_dir / "nats.log"
        return path.read_text(errors="replace") if path.exists() else ""


@dataclass
class NatsCluster:
    nodes: list[Node]

    @property
    def url(self) -> str:
        """Every node, comma-separated (settings.nats_url)."""
        return ",".join(node.url for node in self.nodes)

    def logs(self) -> str:
        return "\n".join(f"--- {n.name}\n{n.log()[-3000:]}" for n in self.nodes)

    async def wait_ready(self, replicas: int = 3, timeout: float = 60.0) -> None:
        """Until JetStream answers and the streams exist with ``replicas`` replicas."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        last: Exception | None = None
        while loop.time() < deadline:
            try:
                nc = await nats.connect(self.url.split(","), connect_timeout=2,
                                        max_reconnect_attempts=0)
            except Exception as err:  # not listening yet
                last = err
                await asyncio.sleep(0.2)
                continue
            try:
                await bus.ensure_streams(nc.jetstream(timeout=5), replicas)
                return
            except (APIError, ServiceUnavailableError, nats.errors.Error,
                    TimeoutError) as err:  # no meta leader yet
                last = err
                await asyncio.sleep(0.5)
            finally:
                await nc.close()
        raise TimeoutError(f"JetStream cluster not ready: {last}\n{self.logs()}")


@contextlib.contextmanager
def nats_cluster(base: Path, size: int = 3) -> Iterator[NatsCluster]:
    nodes = [Node(f"n{i + 1}", free_port(), free_port(), free_port(), base / f"n{i + 1}")
             for i in range(size)]
    cluster = NatsCluster(nodes)
    try:
        for node in nodes:
            node.start([n.route_port for n in nodes if n is not node])
        yield cluster
    finally:
        for node in nodes:
            node.stop()
