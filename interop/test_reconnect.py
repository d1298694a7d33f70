"""A Rust worker whose broker connection is cut reconnects by itself and goes on working.

The cut is made from the broker's side, for the worker's own connections only (the brokers are
shared): RabbitMQ with `rabbitmqctl close_connection`, Redis with `CLIENT KILL ADDR`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
import redis as redis_py

GET_TIMEOUT = 30
BROKER_PORTS = {"rabbitmq": 5672, "redis": 6379}


def local_ports(pid: int, remote_port: int) -> list[int]:
    """Local ports of `pid`'s TCP connections to 127.0.0.1:`remote_port`."""
    out = subprocess.run(["ss", "-tnpH"], capture_output=True, text=True, check=True).stdout
    ports = []
    for line in out.splitlines():
        fields = line.split()
        if f"pid={pid}," in line and fields[4].endswith(f":{remote_port}"):
            ports.append(int(fields[3].rsplit(":", 1)[1]))
    return ports


def cut_rabbitmq(ports: list[int]) -> None:
    listing = subprocess.run(["rabbitmqctl", "-q", "list_connections", "pid", "peer_port"],
                             capture_output=True, text=True, check=True).stdout
    rows = (line.split() for line in listing.splitlines())
    pids = [row[0] for row in rows if len(row) == 2 and row[1].isdigit() and int(row[1]) in ports]
    assert pids, f"no RabbitMQ connection from ports {ports}: {listing}"
    for pid in pids:
        subprocess.run(["rabbitmqctl", "-q", "close_connection", pid, "interop reconnect test"], check=True)


def cut_redis(url: str, ports: list[int]) -> None:
    client = redis_py.Redis.from_url(url)
    for port in ports:
        client.client_kill(f"127.0.0.1:{port}")


@pytest.mark.timeout(90)
def test_worker_reconnects_after_losing_its_broker_connection(broker, spawn_rust_worker):
    if broker.name == "rabbitmq" and (shutil.which("rabbitmqctl") is None or os.geteuid() != 0):
        pytest.skip("cutting one RabbitMQ connection needs rabbitmqctl as root")
    worker = spawn_rust_worker([broker.new_queue("reconnect")], tag="reconnect")
    assert broker.app.send_task("tasks.add", (1, 1), queue=worker.queue).get(timeout=GET_TIMEOUT) == 2
    ports = local_ports(worker.process.pid, BROKER_PORTS[broker.name])
    assert ports, "the worker has no broker connection to cut"
    if broker.name == "rabbitmq":
        cut_rabbitmq(ports)
    else:
        cut_redis(broker.broker_url, ports)
    worker.process.wait_for_log(re.compile(r"broker connection lost; reconnecting"), timeout=30)
    worker.process.wait_for_log(re.compile(r"ready\.(?s:.*)ready\."), timeout=30)
    assert broker.app.send_task("tasks.add", (2, 3), queue=worker.queue).get(timeout=GET_TIMEOUT) == 5
    assert worker.process.alive(), worker.process.log_text()[-2000:]
